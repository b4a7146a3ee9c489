"""`procure serve --no-worker` with runs ticked through the API, as in the seeds: the server does
the worker's upkeep itself. The tick log that every `POST /api/agent-tick` adds to keeps its
window, and a payment left in doubt on a run that was cancelled is settled from the ledger
(here: expired unused, so the run's budget is given back and the spend no longer counts it
pending)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, insert, select

from procure.agent.worker import WorkerConfig
from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.models import utcnow
from procure.store.tables import TickLogRow
from test_cron_keeps_time_for_upkeep import ended_run_paying_in_doubt
from world import World


@pytest.fixture
def server(world: World) -> Iterator[LocalServer]:
    """The API alone (no worker), its upkeep passes a fraction of a second apart."""
    app = create_app(
        world.settings,
        world.store,
        budget_warnings=False,
        upkeep=WorkerConfig(settle_every_s=0.2),
    )
    server = serve(app)
    yield server
    server.stop()


def _until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}, {limit_s:.0f} s on")
        time.sleep(0.1)


def test_the_tick_log_of_api_ticks_keeps_its_window(world: World, server: LocalServer) -> None:
    """Before the fix: only a worker pruned the tick log; a server without one (runs ticked
    through the API) kept every tick's row for ever, past the 7 days kept."""
    run_id = world.new_run()
    ticked = httpx.post(f"{server.url}/api/agent-tick", json={"runId": run_id}, timeout=60)
    assert ticked.status_code == 200, ticked.text
    long_ago = utcnow() - timedelta(days=10)
    with world.store.session() as s:
        s.execute(
            insert(TickLogRow),
            [
                {
                    "run_id": run_id,
                    "owner": "api-old",
                    "started_at": long_ago + timedelta(seconds=i),
                    "finished_at": long_ago + timedelta(seconds=i, milliseconds=5),
                    "outcome": "Job running",
                }
                for i in range(40)
            ],
        )

    def rows(*, old: bool) -> int:
        cutoff = utcnow() - timedelta(days=7)
        when = TickLogRow.finished_at < cutoff if old else TickLogRow.finished_at >= cutoff
        with world.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(TickLogRow).where(when)) or 0)

    _until(lambda: rows(old=True) == 0, "the API's server kept tick log rows 10 days old")
    assert rows(old=False) >= 1  # the API's own tick, within the window, is kept


def test_a_cancelled_run_s_payment_in_doubt_is_settled(world: World, server: LocalServer) -> None:
    """Before the fix: only a worker settled payments in doubt on ended runs; without one the
    payment stayed pending for ever, the run's budget held and the spend counting it pending."""
    # its authorisation long expired
    run_id = ended_run_paying_in_doubt(world.store, utcnow() - timedelta(days=1))

    def status() -> dict[str, object]:
        answer = httpx.get(f"{server.url}/api/agent-status", params={"runId": run_id}, timeout=30)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    _until(
        lambda: status()["payments"][0]["status"] != "pending",  # type: ignore[index]
        "the cancelled run's payment in doubt was still pending",
    )
    settled = status()
    assert settled["payments"][0]["status"] == "failed"  # type: ignore[index]
    assert settled["run"]["budgetRemaining"] == 5.0  # type: ignore[index]
    spend = httpx.get(f"{server.url}/api/spend", timeout=30).json()
    assert spend["pending"] == 0
