"""The worker's batched hot path: plain polls are written with the batch's release, fenced by the
lease (a write whose lease was lost is dropped, the new holder's state stands), nothing is kept
twice, and the tick log keeps a bounded window of history."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, update

from procure.agent.deps import AgentDeps
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.agent.worker import Worker, WorkerConfig
from procure.models import JobStatus, ObservationType, utcnow
from procure.store import leases
from procure.store.tables import JobRow, ObservationRow, RunRow, TickLogRow
from procure.vendors.protocol import VendorJob
from world import World, state_of


def _started_run(world: World) -> str:
    """A run whose job is running at a vendor (one tick of the real agent started it)."""
    run_id = world.new_run()

    async def start() -> str:
        deps = world.deps()
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    assert asyncio.run(start()) == "Job started"
    return run_id


def _poll_once(world: World, report: dict[str, Any], during_poll: Any = None) -> list[str]:
    """One worker pass over the due runs, the vendor answering `report` to every poll;
    `during_poll(run_id)` runs while the vendor is being asked. Returns the tick outcomes."""

    async def go() -> None:
        deps: AgentDeps = world.deps()

        async def status(vendor: Any, *, vendor_job_id: str | None = None, **_: Any) -> VendorJob:
            if during_poll is not None:
                during_poll()
            await asyncio.sleep(0)
            return VendorJob.from_wire({"jobId": vendor_job_id, **report})

        deps.vendors.status = status  # type: ignore[method-assign]
        try:
            await Worker(deps, WorkerConfig(concurrency=4, once=True, poll_interval_s=0)).run()
        finally:
            await close_deps(deps)

    asyncio.run(go())
    with world.store.session() as s:
        return list(s.scalars(select(TickLogRow.outcome).order_by(TickLogRow.id)))


def _logs(world: World, run_id: str) -> list[str]:
    with world.store.session() as s:
        return list(
            s.scalars(
                select(ObservationRow.content).where(
                    ObservationRow.run_id == run_id, ObservationRow.type == ObservationType.job_log
                )
            )
        )


def test_plain_polls_are_written_with_the_release(world: World) -> None:
    run_id = _started_run(world)
    report = {"status": "running", "progress": 0.25, "logs": ["epoch 1", "epoch 2"]}
    assert _poll_once(world, report)[-1] == "Job running (25%)"
    state = state_of(world, run_id)
    (job,) = [j for j in state.jobs if j.status == JobStatus.running]
    assert job.progress == 0.25 and job.log_cursor == 2 and job.progressed_at is not None
    assert state.run.progress == 0.25
    assert _logs(world, run_id).count("epoch 1") == 1
    with world.store.session() as s:
        assert leases.holder(s, run_id) is None  # released with the write

    # The same lines again and one more: only the new one is kept.
    more = {"status": "running", "progress": 0.5, "logs": ["epoch 1", "epoch 2", "epoch 3"]}
    assert _poll_once(world, more)[-1] == "Job running (50%)"
    assert sorted(_logs(world, run_id)) == ["epoch 1", "epoch 2", "epoch 3"]
    assert state_of(world, run_id).run.progress == 0.5


def test_a_poll_whose_lease_was_lost_writes_nothing(world: World) -> None:
    run_id = _started_run(world)
    with world.store.session() as s:  # what the start wrote (the vendor's first answer)
        before = s.scalars(select(JobRow.progress).where(JobRow.run_id == run_id)).one()
    assert before < 0.4

    def taken_over() -> None:  # another worker takes the run while this one asks the vendor
        with world.store.session() as s:
            s.execute(
                update(RunRow)
                .where(RunRow.id == run_id)
                .values(lease_owner="worker-b", lease_expires_at=utcnow() + timedelta(hours=1))
            )

    report = {"status": "running", "progress": 0.4, "logs": ["would be kept twice"]}
    assert _poll_once(world, report, during_poll=taken_over)[-1] == "Job running (40%)"
    with world.store.session() as s:
        job = s.scalars(select(JobRow).where(JobRow.run_id == run_id)).one()
        assert (job.progress, job.log_cursor) == (before, 0)  # the new holder polls from here
        assert leases.holder(s, run_id) == "worker-b"  # and keeps its lease
    assert _logs(world, run_id) == []


def test_the_tick_log_keeps_a_window(world: World) -> None:
    now = utcnow()
    rows = [
        {
            "run_id": f"r{i}",
            "owner": "w",
            "started_at": now - timedelta(days=age),
            "finished_at": now - timedelta(days=age),
            "outcome": "Job running",
        }
        for i, age in enumerate([30, 20, 8, 6, 1, 0])
    ]
    with world.store.session() as s:
        s.execute(insert(TickLogRow), rows)
    with world.store.session() as s:
        assert leases.prune_tick_log(s, older_than_s=7 * 86400, limit=2) == 2  # oldest first
    with world.store.session() as s:
        assert leases.prune_tick_log(s, older_than_s=7 * 86400) == 1
        left = sorted(s.scalars(select(TickLogRow.run_id)))
        assert left == ["r3", "r4", "r5"]
        assert s.scalar(select(func.count()).select_from(TickLogRow)) == 3
