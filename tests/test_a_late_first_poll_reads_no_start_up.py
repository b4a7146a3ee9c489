"""A job's start-up is read off the window it ended in: after the last poll that found the job
not yet running (or its payment) and by the first that found it running. A narrow window gives
its middle; a wide one (the worker was down, polls were sparse) gives no reading, so the planner
keeps pricing the vendor at the start-ups it did see. On a real store (SQLite and PostgreSQL)
with the seeds' mock vendors on loopback, through the real tick."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from procure.agent.context import PlanContext, start_read
from procure.agent.poll import full_context
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.models import Job, RunState, utcnow
from procure.store import repo
from world import World, running_world, seen_starting


@pytest.fixture
def slow_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """The seeds' two vendors, each running a job for a minute (it is still running when polled)."""
    with running_world(tmp_path, db_url, job_seconds=60.0) as w:
        yield w


def _job(world: World, run_id: str) -> Job:
    with world.store.session() as s:
        state = repo.load_tick_state(s, run_id)
    assert state is not None
    [job] = state.jobs
    return job


def _learned_startup(world: World, run_id: str, vendor_id: str) -> float:
    """The start-up, in hours, a poll that must plan prices `vendor_id` at."""
    with world.store.session() as s:
        state = repo.load_tick_state(s, run_id)
    assert isinstance(state, RunState)
    full = full_context(world.deps(), PlanContext(state=state, vendors=[]))
    vendor = next(v for v in full.vendors if v.vendor_id == vendor_id)
    return full.startup_of(vendor)


def _start_and_age(world: World, *, paid_ago: timedelta, queued_ago: timedelta) -> str:
    """A run whose job was paid `paid_ago` and last found queued `queued_ago`, as the poll that
    found it queued left its row (`progressed_at`); the job has run at the vendor since."""
    run_id = world.new_run(hours=1.0)

    async def go() -> None:
        deps = world.deps()
        try:
            assert (await tick(deps, run_id)).message.startswith("Job started")
        finally:
            await close_deps(deps)

    asyncio.run(go())
    job = _job(world, run_id)
    assert job.started_at is None
    now = utcnow()
    with world.store.session() as s:
        # Queued, it had done no work (the mock vendor's clock had moved it on a hair).
        repo.update_job(
            s, job.id, created_at=now - paid_ago, progressed_at=now - queued_ago, progress=0.0
        )
    return run_id


def _poll(world: World, run_id: str) -> str:
    async def go() -> str:
        deps = world.deps()
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    return asyncio.run(go())


def test_a_poll_an_hour_late_reads_no_start_up(slow_world: World) -> None:
    """Before the fix: a job paid 61 minutes ago, last found queued a minute after its payment,
    then not polled for an hour (the worker was down), read a start-up of an hour at the first
    poll that found it running: the vendor, seen starting in 5 minutes three times, was then
    priced at a 20-minute start-up (the mean), which pushes runs due soon away from it until
    200 newer starts push the reading out."""
    world = slow_world
    seen_starting(world, "gpu_vendor_1", timedelta(minutes=5), times=3, ran=timedelta(minutes=5))
    run_id = _start_and_age(world, paid_ago=timedelta(minutes=61), queued_ago=timedelta(minutes=60))
    job = _job(world, run_id)
    assert job.vendor_id == "gpu_vendor_1"
    assert _poll(world, run_id).startswith("Job running")
    polled = _job(world, run_id)
    assert polled.progress > polled.start_progress, "the poll found it working"
    assert polled.started_at is None, "an hour-wide window tells nothing of the start-up"
    # Nor does a later poll read one (the job has worked since: no start-up is left to end).
    assert _poll(world, run_id).startswith("Job running")
    assert _job(world, run_id).started_at is None
    assert _learned_startup(world, run_id, "gpu_vendor_1") == pytest.approx(5 / 60)


def test_a_poll_soon_after_the_job_was_queued_reads_the_middle_of_the_window(
    slow_world: World,
) -> None:
    """Before the fix: a job paid 10 minutes ago and found queued 20 s ago was read as starting
    when the poll found it running (10 minutes); it started somewhere in those 20 s: their
    middle, 9m50s, is off by 10 s at most, not 20."""
    world = slow_world
    run_id = _start_and_age(world, paid_ago=timedelta(minutes=10), queued_ago=timedelta(seconds=20))
    before = _job(world, run_id)
    assert before.progressed_at is not None
    assert _poll(world, run_id).startswith("Job running")
    polled_by = utcnow()
    job = _job(world, run_id)
    assert job.started_at is not None
    assert before.progressed_at < job.started_at < polled_by
    # The middle: as far after the queued poll as before the running one (which lies between
    # the start of the tick and `polled_by`). The running poll's own time is 10 s off it.
    middle = before.progressed_at + (polled_by - before.progressed_at) / 2
    assert abs((job.started_at - middle).total_seconds()) < 5
    # Set once: a later poll does not move it.
    _poll(world, run_id)
    assert _job(world, run_id).started_at == job.started_at


PAID = datetime(2026, 1, 1)


@pytest.mark.parametrize(
    ("queued_after", "seen_after", "read"),
    [
        # Seen running 40 s after its payment, never found queued: it started in those 40 s.
        (None, timedelta(seconds=40), timedelta(seconds=20)),
        # Never found queued and first polled 5 minutes on: anywhere in 5 minutes, not read.
        (None, timedelta(minutes=5), None),
        # Found queued at 20 min, running at 24 min: within a quarter of the 20 min known.
        (timedelta(minutes=20), timedelta(minutes=24), timedelta(minutes=22)),
        # Found queued at 20 min, running at 26 min: more than a quarter, not read.
        (timedelta(minutes=20), timedelta(minutes=26), None),
        # Found queued at 1 min, running 50 s later: within the minute always allowed.
        (timedelta(minutes=1), timedelta(seconds=110), timedelta(seconds=85)),
    ],
)
def test_a_start_up_is_read_only_from_a_narrow_window(
    queued_after: timedelta | None, seen_after: timedelta, read: timedelta | None
) -> None:
    before = PAID + queued_after if queued_after is not None else PAID
    got = start_read(PAID, before, PAID + seen_after)
    assert got == (None if read is None else PAID + read)
