"""What users read agrees with the store and says what went wrong: times on the dashboard are UTC
whatever PostgreSQL's time zone, one rounding of money on every page and in the CLI, a store
failure is one line in every command, and errors go to stderr where scripts read JSON."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from procure.api.app import create_app
from procure.local import free_port, serve
from procure.models import Job, JobSpec, JobStatus, Payment, PaymentStatus, Run, utcnow
from procure.settings import Settings
from procure.store import Store, open_store, repo
from stores import POSTGRES_ENV, postgres_database
from world import procure_cli as procure


def _run_with_payment(store: Store, amount: int, status: PaymentStatus) -> Run:
    """A run with one job and one payment of `amount` micro-USD, as the agent books them."""
    now = utcnow()
    with store.session() as s:
        run = repo.create_run(
            s,
            user_id="u",
            goal="rounding",
            budget_total=10_000_000,
            job_spec=JobSpec(gpu_type="A100", hours=1.0),
        )
        job = Job.model_validate(
            {
                "_id": repo.new_id(),
                "run_id": run.id,
                "vendor_id": "gpu_vendor_1",
                "status": JobStatus.completed,
                "expected_cost": amount,
                "actual_cost": amount,
                "idempotency_key": repo.new_id(),
                "created_at": now,
                "updated_at": now,
            }
        )
        repo.insert_job(s, job)
        pay_id = repo.new_id()
        repo.insert_payment(
            s,
            Payment.model_validate(
                {
                    "_id": pay_id,
                    "run_id": run.id,
                    "job_id": job.id,
                    "vendor_id": "gpu_vendor_1",
                    "amount": amount,
                    "status": status,
                    "nonce": pay_id,
                    "x402_tx_id": "0xabc" if status == PaymentStatus.completed else None,
                    "created_at": now,
                    "updated_at": now,
                }
            ),
        )
        repo.refresh_budget(s, run.id)
    return run


@pytest.fixture
def dashboard(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, Store]]:
    store = open_store(sqlite_url)
    settings = Settings(PROCURE_DATABASE_URL=sqlite_url, PROCURE_HOME=tmp_path / "home")
    running = serve(create_app(settings, store, budget_warnings=False))
    yield running.url, store
    running.stop()
    store.dispose()


def test_runs_page_spend_line_agrees_with_the_runs_spent_to_the_cent(
    dashboard: tuple[str, Store],
) -> None:
    """Before the fix: the runs page rounds the same money two ways: a run's "Spent to date"
    (Decimal, half-even) says $1.02 for a settled $1.015 payment, while the page's "Spent across all
    runs" line (float "%.2f") says $1.01 for the very same, only payment. One user-facing rounding
    must serve both."""
    url, store = dashboard
    _run_with_payment(store, 1_015_000, PaymentStatus.completed)
    html = httpx.get(f"{url}/", timeout=30).text
    row = re.search(r'<td class="num">(\$[\d.,]+)</td>\s*<td class="when">', html)
    line = re.search(r"Spent across all runs: <strong>(\$[\d.,]+)</strong>", html)
    assert row and line, html
    # one run, one settled payment: the total across all runs is that run's spend
    assert line.group(1) == row.group(1), (line.group(1), row.group(1))


@pytest.mark.parametrize(
    "command",
    [
        ("vendors", "list"),
        ("vendors", "add-cloud", "lambda", "--gpu", "A100", "--max-price", "2"),
        ("offers", "--json"),
        ("worker", "--once"),
        ("serve",),
    ],
)
def test_store_failure_is_one_line_for_vendors_list_offers_worker_and_serve(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Before the fix: `procure vendors list`, `vendors add-cloud`, `offers`, `worker` and `serve`
    open the store outside `store_errors`: a store that cannot be opened prints a ~450-line Rich
    traceback instead of the one `error: the store (...) failed: ...` line of `run list` and
    `spend`."""
    url = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'p.db'}"
    port = ("--port", str(free_port())) if command == ("serve",) else ()
    result = procure(
        *command,
        *port,
        env={
            "PROCURE_DATABASE_URL": url,
            "PROCURE_HOME": str(tmp_path / "home"),
            "LAMBDA_API_KEY": "",
            "RUNPOD_API_KEY": "",
            "VAST_API_KEY": "",
        },
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out, out[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the store ("), out[-2000:]


@pytest.fixture
def new_york_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database whose TimeZone is America/New_York (a server installed with
    the machine's local zone, as initdb does by default)."""
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    with postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        admin = create_engine(os.environ[POSTGRES_ENV], isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'"))
        finally:
            admin.dispose()
        yield url


def test_dashboard_times_marked_utc_are_utc_on_a_non_utc_postgres(
    new_york_postgres: str, tmp_path: Path
) -> None:
    """Before the fix: the dashboard prints every time as "YYYY-MM-DD HH:MM:SS UTC", but on a
    PostgreSQL whose TimeZone is not UTC the store hands back times in that zone (UtcDateTime
    converts only naive values): a run created at 06:00 UTC reads "01:00:00 UTC" on its page, five
    hours off."""
    store = open_store(new_york_postgres)
    settings = Settings(PROCURE_DATABASE_URL=new_york_postgres, PROCURE_HOME=tmp_path / "home")
    running = serve(create_app(settings, store, budget_warnings=False))
    try:
        run = _run_with_payment(store, 1_000_000, PaymentStatus.completed)
        created_utc = run.created_at.astimezone(UTC)
        html = httpx.get(f"{running.url}/runs/{run.id}", timeout=30).text
        shown = re.search(r"<dt>Created</dt><dd>([^<]+)</dd>", html)
        assert shown, html
        assert shown.group(1) == f"{created_utc:%Y-%m-%d %H:%M:%S} UTC", shown.group(1)
    finally:
        running.stop()
        store.dispose()


@pytest.mark.parametrize("command", [("wallet", "--json"), ("run", "status", "no-such-run")])
def test_cli_errors_go_to_stderr_where_scripts_read_the_json(
    tmp_path: Path, sqlite_url: str, command: tuple[str, ...]
) -> None:
    """Before the fix: `procure wallet --json` (facilitator down) and `procure run status|tick`
    (unknown run) print their error with the Rich console on stdout, not on stderr as `fail()` does:
    piped to `jq` the user sees only a JSON parse error, never the message that says what to do."""
    result = procure(
        *command,
        env={
            "PROCURE_DATABASE_URL": sqlite_url,
            "PROCURE_HOME": str(tmp_path / "home"),
            "X402_FACILITATOR_URL": f"http://127.0.0.1:{free_port()}",
        },
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip(), "the error is not on stderr"
    assert result.stdout.strip() == "", f"stdout is not JSON: {result.stdout!r}"
