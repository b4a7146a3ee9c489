"""The serverless cron call (`GET /api/cron/tick`) keeps part of its budget for its upkeep: a
call whose ticks run to the end of its budget (a vendor that never answers) still prunes the
tick log, and a facilitator that never answers the settlement lookups of payments in doubt on
ended runs cannot hold the call past the platform's limit (Vercel kills it there, before it
prunes). Otherwise a busy or slow deployment's tick log grows without bound."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from procure.agent import leased_tick
from procure.agent.deps import TickResult
from procure.api.serverless import tick_due
from procure.models import JobSpec, JobStatus, PaymentStatus, RunStatus, utcnow
from procure.settings import Settings
from procure.store import Store, leases, open_store, repo
from procure.store.tables import JobRow, PaymentRow, RunRow, TickLogRow

PLATFORM_MARGIN_S = 15.0
"""How long past its budget the platform lets a cron call run before killing it (Vercel's
`maxDuration` of 60 s over the default budget of 45 s)."""


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


def _old_ticks(store: Store, run_id: str, n: int) -> None:
    """`n` tick log rows of the run from ten days ago (past the 7 days kept)."""
    start = utcnow() - timedelta(days=10)
    rows = [
        {
            "run_id": run_id,
            "owner": "cron-old",
            "started_at": start + timedelta(seconds=i),
            "finished_at": start + timedelta(seconds=i, milliseconds=5),
            "outcome": "Job running",
        }
        for i in range(n)
    ]
    with store.session() as s:
        s.execute(insert(TickLogRow), rows)


def _old_rows(store: Store) -> int:
    cutoff = utcnow() - timedelta(days=8)
    with store.session() as s:
        return int(
            s.scalar(
                select(func.count()).select_from(TickLogRow).where(TickLogRow.finished_at < cutoff)
            )
            or 0
        )


def _new_run(store: Store) -> str:
    with store.session() as s:
        return repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id


def _as_the_platform_runs_it(settings: Settings, store: Store, budget_s: float) -> dict[str, Any]:
    """One cron call, killed (cancelled) if it runs past its budget and the platform's margin;
    raises TimeoutError then."""

    async def call() -> dict[str, Any]:
        return await asyncio.wait_for(
            tick_due(settings, store, budget_s=budget_s, pause_s=0.05),
            timeout=budget_s + PLATFORM_MARGIN_S,
        )

    return asyncio.run(call())


def test_a_cron_call_whose_ticks_run_to_its_budget_still_prunes(
    db_url: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the call pruned with what was left of its budget after ticking; a round
    still running at the budget's end (a vendor that never answers) is cut there, leaving no
    time at all, and the pass then deleted nothing: under load the tick log was never pruned."""
    run_id = _new_run(store)
    _old_ticks(store, run_id, 50)

    async def endless_tick(_deps: object, _run_id: str, **_kw: object) -> TickResult:
        await asyncio.sleep(3600)  # a vendor that never answers
        return TickResult("never")

    monkeypatch.setattr(leased_tick, "tick", endless_tick)
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    answer = _as_the_platform_runs_it(settings, store, budget_s=1.5)
    assert answer["cut"] == 1, answer
    assert _old_rows(store) == 0, f"the tick log's old rows were kept: {answer}"
    assert answer["pruned"] >= 50
    with store.session() as s:
        assert leases.holder(s, run_id) is None


def ended_run_paying_in_doubt(store: Store, now: datetime | None = None) -> str:
    """A cancelled run with a payment still pending (a signed authorisation in doubt) of $2 of
    its $5, made at `now` (default: this moment); its id."""
    now = now or utcnow()
    run_id, job_id = uuid.uuid4().hex[:24], uuid.uuid4().hex[:24]
    with store.session() as s:
        s.execute(
            insert(RunRow),
            [
                {
                    "id": run_id,
                    "user_id": "u",
                    "goal": "g",
                    "status": RunStatus.cancelled,
                    "budget_total": 5_000_000,
                    "budget_remaining": 3_000_000,
                    "job_spec": {"gpu_type": "A100", "hours": 1.0},
                    "progress": 0.2,
                    "created_at": now,
                    "updated_at": now,
                }
            ],
        )
        s.execute(
            insert(JobRow),
            [
                {
                    "id": job_id,
                    "run_id": run_id,
                    "vendor_id": "gpu_vendor_1",
                    "vendor_job_id": None,
                    "status": JobStatus.cancelled,
                    "expected_cost": 2_000_000,
                    "job_params": {},
                    "idempotency_key": f"job-{job_id}",
                    "created_at": now,
                    "updated_at": now,
                }
            ],
        )
        s.execute(
            insert(PaymentRow),
            [
                {
                    "id": uuid.uuid4().hex[:24],
                    "run_id": run_id,
                    "job_id": job_id,
                    "vendor_id": "gpu_vendor_1",
                    "amount": 2_000_000,
                    "currency": "USD",
                    "status": PaymentStatus.pending,
                    "nonce": "0x" + uuid.uuid4().hex * 2,
                    "error_message": "refused: no answer",
                    "created_at": now,
                    "updated_at": now,
                }
            ],
        )
    return run_id


def test_a_cron_call_answers_before_the_platform_limit_when_the_ledger_hangs(
    db_url: str, store: Store, tmp_path: Path
) -> None:
    """Before the fix: after ticking, the call settled the payments in doubt on ended runs
    without a deadline, one facilitator lookup (10 s each) after another; with the facilitator
    not answering, a few of them held the call past the platform's limit, which killed it
    before it pruned anything, call after call."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        for _ in range(2):
            ended_run_paying_in_doubt(store)
        run_id = _new_run(store)
        _old_ticks(store, run_id, 50)
        with store.session() as s:  # nothing due: the call goes straight to its upkeep
            s.execute(RunRow.__table__.update().values(next_tick_at=utcnow() + timedelta(days=1)))
        settings = Settings(
            PROCURE_DATABASE_URL=db_url,
            PROCURE_HOME=tmp_path,
            X402_FACILITATOR_URL=f"http://127.0.0.1:{silent.getsockname()[1]}",
        )
        try:
            answer = _as_the_platform_runs_it(settings, store, budget_s=2.0)
        except TimeoutError:
            pytest.fail("the platform killed the cron call: it waited on the facilitator")
        assert answer["settled"] == 0
        assert _old_rows(store) == 0, answer
        with store.session() as s:  # nothing was guessed about the payments in doubt
            pending = s.scalar(
                select(func.count())
                .select_from(PaymentRow)
                .where(PaymentRow.status == PaymentStatus.pending)
            )
        assert pending == 2
    finally:
        silent.close()
