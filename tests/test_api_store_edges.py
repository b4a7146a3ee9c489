"""The HTTP API, dashboard and store at their edges: a forged cursor, a deep or quadratic body
before authentication, observations committed out of id order, a rollback and upgrade of the
schema, two registrations of one vendor at once, and a facilitator URL's password."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from alembic import command
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from procure.api.app import create_app
from procure.local import LocalServer, free_port, serve
from procure.models import JobSpec, ObservationType, Vendor, utcnow
from procure.settings import Settings
from procure.store import Store, open_store, repo
from procure.store.db import alembic_config
from procure.store.tables import JobRow, PaymentRow
from procure.web.events import StreamLimits, run_events

TOKEN = "review9-token"


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[str]:
    """The API over a fresh store (both backends), with a token set."""
    store = open_store(db_url)
    settings = Settings(
        PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path / "home", PROCURE_API_TOKEN=TOKEN
    )
    running: LocalServer = serve(create_app(settings, store, budget_warnings=False))
    yield running.url
    running.stop()
    store.dispose()


def _cursor(at: str, id_: str) -> str:
    raw = json.dumps([at, id_]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_a_cursor_with_an_out_of_range_time_is_a_400(api: str) -> None:
    """Before the fix: a forged cursor whose time is valid ISO but leaves the datetime range once
    turned to UTC (year 9999 west of UTC, year 1 east of it) passes `keyset.decode`, then the
    store's bind raises OverflowError: every paged list answers 500 instead of 400."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for at in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"):
        forged = _cursor(at, "x")
        for path in ("/api/runs", "/api/payments", "/api/fleet/actions"):
            answer = httpx.get(f"{api}{path}", params={"cursor": forged}, headers=auth, timeout=30)
            assert answer.status_code == 400, (path, at, answer.status_code, answer.text)
        page = httpx.get(f"{api}/", params={"before": forged}, headers=auth, timeout=30)
        assert page.status_code == 400, (at, page.status_code)


_CHILD = """
import sys, uvicorn
from procure.settings import Settings
home, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
url = f"sqlite:///{home}/procure.db"
settings = Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=f"{home}/home",
                    PROCURE_API_TOKEN="review9-token")
if kind == "serverless":
    from procure.api.serverless import create_serverless_app, serverless_store
    app = create_serverless_app(settings, serverless_store(url, upgrade=True))
else:
    from procure.api.app import create_app
    from procure.store import open_store
    app = create_app(settings, open_store(url), budget_warnings=False)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


@contextlib.contextmanager
def _child_api(tmp_path: Path, kind: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The API (`kind`: "main" or "serverless") in a process of its own, so that a request
    that crashes or freezes it cannot take the test's process along; killed afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCURE_")}
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(port), kind], cwd=tmp_path, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the API did not start"
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API did not answer /healthz in 60 s"
            time.sleep(0.1)
        yield base, process
    finally:
        process.kill()
        process.wait(timeout=30)


def _post(url: str, body: bytes) -> int | str:
    """The status of an unauthenticated JSON POST, or the name of the error it met."""
    try:
        answer = httpx.post(
            url, content=body, headers={"content-type": "application/json"}, timeout=30
        )
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return answer.status_code


def test_deeply_nested_json_cannot_kill_the_serverless_app(tmp_path: Path) -> None:
    """Before the fix: the serverless app (`create_serverless_app`, deployed on Vercel) lacks the
    `BoundedRequests` middleware of the main app. py_ecc (via eth-account) raises the recursion
    limit to 100,000, so an unauthenticated 200 kB body of nested arrays makes the JSON parser
    overflow the C stack: the process dies with SIGSEGV instead of answering 400."""
    with _child_api(tmp_path, "serverless") as (base, process):
        depth = 100_000
        status = _post(f"{base}/api/agent-tick", b'{"runId":' + b"[" * depth + b"]" * depth + b"}")
        try:
            alive = httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        except httpx.HTTPError:
            alive = False
        if not alive:
            process.wait(timeout=30)  # it is gone: say how it ended
        assert alive, f"the serverless app died (exit {process.returncode}); answer: {status}"
        assert status in (400, 401, 413, 422), status


def test_escaped_quotes_cannot_freeze_the_api_before_authentication(tmp_path: Path) -> None:
    """Before the fix: `bounds.json_depth` strips strings with `_STRING` (`"(?:[^"\\]|\\.)*"`),
    which on an unterminated string of escaped quotes restarts at every quote and scans to the end:
    quadratic. `BoundedRequests` runs it on the event loop before any authentication, so one
    unauthenticated 300 kB body (`[{"` then `\\"` repeated) holds the whole API (pages, /healthz,
    ticks) for minutes; the same check guards every vendor, cloud and facilitator answer."""
    with _child_api(tmp_path, "main") as (base, _process):
        status = _post(f"{base}/api/agent-start", b'[{"' + b'\\"' * 150_000)
        assert status in (400, 401, 413, 422), f"no answer in 30 s: {status}"
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_the_live_timeline_keeps_an_observation_committed_out_of_id_order(db_url: str) -> None:
    """Before the fix: on PostgreSQL an observation's id is taken at INSERT, not at commit. Writers
    outside the run's lease add observations to a run (budget warnings, the cloud sweeper, a cancel
    request): when one commits while a tick's transaction holding a lower id is still open, the live
    timeline (SSE, resuming after the last id it sent) moves past the lower id, and the tick's
    observation never reaches the page."""
    store = open_store(db_url)
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id

    async def never() -> bool:
        return False

    async def scenario() -> list[str]:
        stream = run_events(
            store, run_id, 0, never, StreamLimits(poll_s=0.02, heartbeat_s=60, max_s=30)
        )
        shown: list[str] = []

        async def read_until(done: Callable[[str], bool]) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                chunk = await stream.__anext__()
                if chunk.startswith("id: "):  # an observation
                    shown.append(json.loads(chunk.split("data: ", 1)[1])["content"])
                if done(chunk):
                    return
            raise AssertionError(f"not streamed in 30 s; shown: {shown}")

        def warn() -> None:
            with store.session() as warning:
                repo.add_observation(warning, run_id, ObservationType.agent_reasoning, "warned")

        # The other writer runs in its own thread, as it does in production: once ids follow
        # commit order it waits for the tick's transaction, which in this thread would never end.
        warning = threading.Thread(target=warn)
        with store.session() as tick:  # a tick's transaction: its observation's id is taken
            repo.add_observation(tick, run_id, ObservationType.job_log, "from the tick")
            tick.flush()
            warning.start()
            deadline = time.monotonic() + 30
            while warning.is_alive() and not _waiting_on_a_lock(store):
                assert time.monotonic() < deadline, "the warning neither committed nor waited"
                time.sleep(0.05)
            if not warning.is_alive():  # it committed a higher id first: the stream shows it
                await read_until(lambda _chunk: "warned" in shown)
        warning.join(timeout=30)
        with store.session() as s:  # the tick committed; then the run ends
            repo.update_run(s, run_id, status="completed")
        await read_until(lambda chunk: chunk.startswith("event: end"))
        await stream.aclose()
        return shown

    try:
        shown = asyncio.run(scenario())
    finally:
        store.dispose()
    assert sorted(shown) == ["from the tick", "warned"], shown


def _paid_run(store: Store, amount: int) -> None:
    """A run with one job and one completed payment of `amount` micro-USD."""
    now = utcnow()
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=10_000_000, job_spec=JobSpec()
        ).id
        job_id = repo.new_id()
        s.add(
            JobRow(
                id=job_id,
                run_id=run_id,
                vendor_id="v1",
                status="completed",
                expected_cost=amount,
                job_params={},
                idempotency_key=f"key-{job_id}",
                created_at=now,
                updated_at=now,
            )
        )
        s.flush()
        s.add(
            PaymentRow(
                id=repo.new_id(),
                run_id=run_id,
                job_id=job_id,
                vendor_id="v1",
                amount=amount,
                currency="USDC",
                status="completed",
                nonce=f"0x{job_id}",
                created_at=now,
                updated_at=now,
            )
        )


def test_spend_counts_payments_after_a_rollback_and_upgrade(db_url: str, tmp_path: Path) -> None:
    """Before the fix: migration 0010's downgrade rebuilds `payments` with Alembic's batch mode,
    which on SQLite drops the table's triggers (migration 0008's running totals). After an operator
    rolls one release back and forward again (`open_store` upgrades to head), every new payment is
    missing from `GET /api/spend` (and the dashboard's spend line and /metrics)."""
    before = open_store(db_url)
    _paid_run(before, 1_500_000)  # $1.50 before the rollback
    before.dispose()
    command.downgrade(alembic_config(db_url), "0009")
    store = open_store(db_url)  # the newer release again: migrated back to head
    _paid_run(store, 2_250_000)  # $2.25 after it
    settings = Settings(
        PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path / "home", PROCURE_API_TOKEN=TOKEN
    )
    running = serve(create_app(settings, store, budget_warnings=False))
    try:
        spend = httpx.get(
            f"{running.url}/api/spend", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        ).json()
        listed = httpx.get(
            f"{running.url}/api/payments",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ).json()
    finally:
        running.stop()
        store.dispose()
    assert sum(p["amount"] for p in listed) == pytest.approx(3.75)  # what the store holds
    assert spend["paid"] == pytest.approx(3.75), spend


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_registering_a_vendor_beside_another_registration_succeeds(
    db_url: str, tmp_path: Path
) -> None:
    """Before the fix: `PUT /api/vendors/{id}` reads the vendor, then inserts it when it was not
    there: when another registration of the same new id (a second operator, a client retrying after
    a timeout) commits in between, the insert meets the primary key and the caller gets 500
    "internal error" instead of the vendor (replaced, 200) or a 409."""
    store = open_store(db_url)
    settings = Settings(
        PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path / "home", PROCURE_API_TOKEN=TOKEN
    )
    running = serve(create_app(settings, store, budget_warnings=False))
    body = {
        "vendorId": "v-race",
        "name": "Race",
        "endpoint": "http://127.0.0.1:9",
        "basePricePerHour": 1.0,
        "reliabilityScore": 0.9,
        "supportedGpuTypes": ["A100"],
    }
    answers: list[httpx.Response] = []
    try:
        with store.session() as other:  # the other registration, not yet committed
            repo.save_vendor(other, Vendor.model_validate({**body, "basePricePerHour": 1}))
            other.flush()
            put = threading.Thread(
                target=lambda: answers.append(
                    httpx.put(
                        f"{running.url}/api/vendors/v-race",
                        json=body,
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=60,
                    )
                )
            )
            put.start()
            deadline = time.monotonic() + 30
            while not _waiting_on_a_lock(store):  # the PUT found nothing, now inserts
                assert time.monotonic() < deadline, "the PUT never waited on the other insert"
                time.sleep(0.05)
        put.join(timeout=60)
    finally:
        running.stop()
        store.dispose()
    assert answers and answers[0].status_code in (200, 409), answers[0].text if answers else None


def _waiting_on_a_lock(store: Store) -> bool:
    """Whether a session of this database waits on a lock (read afresh: PostgreSQL keeps one
    snapshot of its activity view per transaction)."""
    with store.engine.connect() as connection:
        waiting = connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


def test_the_vendors_page_never_shows_the_facilitator_password(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Before the fix: `settings.http_url` accepts a facilitator URL with credentials in it (and
    says its messages never repeat a URL, as it may hold a secret), but when the facilitator refuses
    the balance lookup, httpx's error text, URL and password included, is shown on the dashboard's
    Vendors page (readable by anyone under PROCURE_PUBLIC_READ)."""
    refusing = FastAPI()

    @refusing.get("/balance/{address}")
    async def balance(address: str) -> JSONResponse:
        return JSONResponse({"error": "unauthorised"}, status_code=401)

    facilitator = serve(refusing)
    store = open_store(sqlite_url)
    password = "fac1l1tator-pw"
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url,
        PROCURE_HOME=tmp_path / "home",
        PROCURE_API_TOKEN=TOKEN,
        X402_FACILITATOR_URL=facilitator.url.replace("://", f"://procure:{password}@"),
    )
    running = serve(create_app(settings, store, budget_warnings=False))
    try:
        page = httpx.get(
            f"{running.url}/vendors", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
    finally:
        running.stop()
        facilitator.stop()
        store.dispose()
    assert page.status_code == 200
    assert "unavailable" in page.text  # the balance could not be read: the page says so
    assert password not in page.text


def test_a_postgresql_server_that_never_answers_fails_the_connection_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the fix: libpq waits for ever by default for a server that accepts the connection
    and never answers (a frozen host, a half-open proxy): opening the store hung `procure serve`
    or a worker with no error at all. Now a connection gives up after `store.db.CONNECT_TIMEOUT_S`
    (10 s, unless the URL sets its own `connect_timeout`), saying why."""
    import socket

    from sqlalchemy.exc import OperationalError

    from procure.store import db

    # The default, shortened (libpq's least, 2 s): the URL below sets none, so it is what ends
    # the wait; 10 s of it was the longest wait of this file.
    monkeypatch.setattr(db, "CONNECT_TIMEOUT_S", 2)

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    port = silent.getsockname()[1]
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:  # opening the store reads its schema's revision: the first connection
            store = open_store(f"postgresql+psycopg://u:p@127.0.0.1:{port}/db")
            store.dispose()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(120)
    silent.close()
    assert outcome, "opening a store on a server that never answers still waits after 120 s"
    assert isinstance(outcome[0], OperationalError), outcome
    assert "timeout" in str(outcome[0]).lower()
