"""The real tick learns each vendor's start-up from its own jobs: a poll that first finds a job
running records when (`started_at`, once), and the tick, before it plans, reads the start-ups of
the jobs most recently seen starting, so a vendor seen starting slowly is priced at its own
start-up, not at the usual 0.1 h. A start-up is the time from the job's creation (its payment) to
then, which holds at a vendor that runs an hour of work in seconds too (the wall time less the
work done read 0 there). On a real store (SQLite and PostgreSQL) with the seeds' mock vendors on
loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text

from procure.agent.context import PlanContext, observed_startup
from procure.agent.poll import full_context
from procure.agent.runtime import close_deps
from procure.agent.tick import polling, tick
from procure.models import Job, JobSpec, JobStatus, ObservationType, RunState, usd_to_micros, utcnow
from procure.store import hotpath, open_store, repo
from procure.store.db import HEAD, alembic_config, make_engine, revision
from procure.store.hotpath import PollWrite
from world import World, running_world, seen_starting

WAIT_S = 60.0  # a safety net for a loaded machine, never a measure of speed


@pytest.fixture
def slow_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """The seeds' two vendors, each running a job for a minute (it is still running when polled)."""
    with running_world(tmp_path, db_url, job_seconds=60.0) as w:
        yield w


def _jobs(world: World, run_id: str) -> list[Job]:
    with world.store.session() as s:
        state = repo.load_tick_state(s, run_id)
    assert state is not None
    return state.jobs


def test_a_job_polled_running_gets_its_start_time_once(slow_world: World) -> None:
    """Before the fix: no poll kept when a job was first seen running, so the tick had nothing
    to learn a vendor's start-up from but the wall time less the work done, which reads 0 at a
    vendor that compresses time (the mock vendors) and is known only once the job has ended."""
    world = slow_world
    run_id = world.new_run(hours=1.0)

    async def go() -> None:
        deps = world.deps()
        try:
            assert (await tick(deps, run_id)).message.startswith("Job started"), "planned"
            [job] = _jobs(world, run_id)
            assert job.status == JobStatus.running and job.started_at is None  # not polled yet
            # The worker's batched poll: the tick hands its write over, the worker writes it.
            with world.store.session() as s:
                state = repo.load_tick_state(s, run_id)
                vendor = repo.get_vendor_row(s, job.vendor_id)
            assert state is not None and vendor is not None and polling(state) is not None
            sink: list[PollWrite] = []
            await tick(deps, run_id, loaded=(state, vendor), sink=sink)
            assert len(sink) == 1
            with world.store.session() as s:
                hotpath.apply_polls(s, sink)
            [first] = _jobs(world, run_id)
            assert first.started_at is not None
            assert job.created_at <= first.started_at <= utcnow()
            if world.store.is_sqlite:  # kept in the text form of every other time there
                with world.store.engine.connect() as c:
                    kept = c.execute(text("SELECT started_at, created_at FROM jobs")).one()
                assert len(kept[0]) == len(kept[1]) and "+" not in kept[0], kept
            # Later polls (the plain one of a tick alone, here) leave it where it was.
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                await tick(deps, run_id)
                [later] = _jobs(world, run_id)
                if later.progress > first.progress:
                    break
                await asyncio.sleep(0.1)
            assert later.progress > first.progress, "the job ran on between the polls"
            assert later.started_at == first.started_at
            # Nor does a poll built on a stale row (one taken before the first was written).
            stale = PollWrite(
                run_id=run_id,
                job_id=job.id,
                log_cursor=later.log_cursor,
                progress=later.progress,
                checkpoint_url=later.checkpoint_url,
                checkpoint_progress=later.checkpoint_progress,
                progressed_at=later.progressed_at,
                started_at=utcnow() + timedelta(hours=1),
            )
            with world.store.session() as s:
                hotpath.apply_polls(s, [stale])
            [last] = _jobs(world, run_id)
            assert last.started_at == first.started_at
            # The start-up the planner learns from it: creation to that first running poll.
            assert observed_startup(last) == pytest.approx(
                (first.started_at - job.created_at).total_seconds() / 3600
            )
        finally:
            await close_deps(deps)

    asyncio.run(go())


def test_a_start_up_is_the_time_to_running_even_where_an_hour_of_work_takes_seconds() -> None:
    """Before the fix: a job paid at 0:00, first seen running at 0:12 and completed 36 s later
    (an hour of work, compressed) read a start-up of 0 (0.21 h of wall time less 1 h of work)."""
    paid = datetime(2026, 1, 1, 0, 0)
    job = Job(
        _id="j",
        run_id="r",
        vendor_id="v",
        status=JobStatus.completed,
        expected_cost=1,
        job_params={"hours": 1.0, "totalHours": 1.0},
        idempotency_key="k",
        progress=1.0,
        started_at=paid + timedelta(minutes=12),
        created_at=paid,
        updated_at=paid,
        completed_at=paid + timedelta(minutes=12, seconds=36),
    )
    assert observed_startup(job) == pytest.approx(0.2)


def test_the_tick_prices_a_vendor_seen_starting_slowly_at_its_own_start_up(
    slow_world: World,
) -> None:
    """Before the fix: the tick planned every vendor at the usual 0.1 h start-up, so a 1 h run
    due in 1.3 h went to SteadyCompute ($2.10/h, the steadiest) though its jobs had been seen
    taking half an hour to start: its start-up does not fit, and the run was bound to miss.
    FastGPU ($1.40/h, flakier, no start-up seen) still fits and gets it."""
    world = slow_world
    seen_starting(world, "gpu_vendor_2", timedelta(minutes=30), times=3, ran=timedelta(seconds=40))
    with world.store.session() as s:
        run_id = repo.create_run(
            s,
            user_id="u1",
            goal="due soon",
            budget_total=usd_to_micros(20),
            job_spec=JobSpec(hours=1.0),
            deadline=utcnow() + timedelta(hours=1.3),
        ).id

    async def go() -> str:
        deps = world.deps()
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    assert asyncio.run(go()).startswith("Job started")
    [job] = _jobs(world, run_id)
    assert job.vendor_id == "gpu_vendor_1"
    with world.store.session() as s:
        plan = [
            o.content
            for o in repo.list_observations(s, run_id)
            if o.type == ObservationType.agent_reasoning and "is the best choice" in o.content
        ]
    [said] = plan
    assert said.startswith("gpu_vendor_1 (FastGPU) is the best choice"), said
    steady = said[said.index("gpu_vendor_2: ") :]
    assert "p(miss deadline)=1.00" in steady, said

    # A poll that must plan (a renewal the planner may turn down) sees the same start-ups.
    with world.store.session() as s:
        state = repo.load_tick_state(s, run_id)
    assert isinstance(state, RunState)
    bare = PlanContext(state=state, vendors=[])
    full = full_context(world.deps(), bare)
    vendor_2 = next(v for v in full.vendors if v.vendor_id == "gpu_vendor_2")
    assert full.startup_of(vendor_2) == pytest.approx(0.5)


def test_the_start_time_migration_upgrades_and_downgrades(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:

        def started() -> tuple[bool, bool]:
            found = inspect(engine)
            columns = {c["name"] for c in found.get_columns("jobs")}
            indexes = {i["name"] for i in found.get_indexes("jobs")}
            return "started_at" in columns, "ix_jobs_started" in indexes

        open_store(empty_db_url).dispose()
        assert revision(engine) == HEAD and started() == (True, True)
        command.downgrade(alembic_config(empty_db_url), "0016")
        assert revision(engine) == "0016" and started() == (False, False)
        open_store(empty_db_url).dispose()
        assert revision(engine) == HEAD and started() == (True, True)
    finally:
        engine.dispose()
