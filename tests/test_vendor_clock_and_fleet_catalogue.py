"""Second looks at the fleet on RunPod/Vast.ai and the agent buying from the gateway: a vendor's
`logsOffset` is bounded, its `paidUntil` never buys more than a slice ahead nor for a queued job,
a rebooting fleet instance is not taken for one that never booted, and a failing catalogue read
leaves the fleet scanning with the types it knows."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.local import facilitator_client, serve
from procure.models import Action, utcnow
from procure.store import repo
from procure.vendors.mock import create_mock_vendor_app
from test_agent_buys_from_gateway import LONG_JOB, preempt_the_only_gpu, sliced_planner
from test_gateway import job_status, start_gateway_world
from world import TERMINAL, Rewrite, World, rewriting, start_world, state_of


def hostile_vendor(world: World, vendor_id: str, rewrite: Rewrite, **config: Any) -> None:
    """Replace `vendor_id`'s endpoint with a mock vendor like it (its config, with `config`
    changed) whose job-status answers go through `rewrite`: an x402 vendor saying what it likes."""
    cfg = dataclasses.replace(world.vendor_servers[vendor_id].app.state.config, **config)
    app = create_mock_vendor_app(cfg, facilitator_client(world.facilitator.url))
    server = serve(rewriting(app, rewrite))  # type: ignore[arg-type]
    world.servers.append(server)
    vendor = world.vendors[vendor_id].model_copy(update={"endpoint": server.url})
    with world.store.session() as s:
        repo.save_vendor(s, vendor)


def tick_until(
    world: World,
    run_id: str,
    done: Callable[[Any], bool],
    limit_s: float = 30,
    max_ticks: int | None = None,
) -> str:
    """Tick the run as the worker does (a tick that raises is retried, the others go on) until
    `done(state)` or the run ends (or `max_ticks` ticks); the last tick error, if any."""
    deps = dataclasses.replace(world.deps(), reconsider=None)
    error = ""

    async def go() -> None:
        nonlocal error
        try:
            deadline = time.monotonic() + limit_s
            for _ in itertools.count() if max_ticks is None else range(max_ticks):
                if time.monotonic() >= deadline:
                    return
                try:
                    await tick(deps, run_id)
                except Exception as exc:  # the worker logs it and ticks again
                    error = f"{type(exc).__name__}: {str(exc)[:300]}"
                state = state_of(world, run_id)
                if state.run.status in TERMINAL or done(state):
                    return
                await asyncio.sleep(0.05)
        finally:
            await close_deps(deps)

    asyncio.run(go())
    return error


@pytest.fixture
def plain_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = start_world(tmp_path, db_url)
    yield w
    w.stop()


def test_a_vendors_logs_offset_past_32_bits_is_refused_and_the_run_goes_on(
    plain_world: World,
) -> None:
    """Before the fix: the protocol accepts any `logsOffset` up to 10**12 and the agent stores
    `start + len(logs)` as the job's log cursor, an INTEGER (32 bits) column: on PostgreSQL every
    poll's write fails (integer out of range), so the run never records progress and never
    completes."""
    world = plain_world
    hostile_vendor(world, "gpu_vendor_1", lambda job: {**job, "logsOffset": 3_000_000_000})
    run_id = world.new_run(budget=5.0)
    error = tick_until(world, run_id, lambda state: False)
    state = state_of(world, run_id)
    jobs = [(j.vendor_id, j.status, j.progress) for j in state.jobs]
    assert state.run.status == "completed", f"{state.run.status}; jobs {jobs}; tick error {error}"


def sliced(vendor_id: str, slice_hours: float) -> Any:
    async def plan(ctx: Any) -> Action:
        if ctx.state.jobs:
            return Action(action="wait", reason="the test looks at the first job only")
        return Action(
            action="start_job",
            vendor_id=vendor_id,
            gpu_type="A100",
            hours=1.0,
            slice_hours=slice_hours,
            reason="sliced",
        )

    return plan


def test_a_vendors_paid_until_never_buys_more_than_a_slice_ahead_of_the_work(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: the agent renews a sliced job whenever the vendor's `paidUntil` is near,
    whatever the job did: a vendor that always says its paid time ends now is paid every slice of
    the job, one per poll, while the job has hardly started (slicing's promise, "a failure loses at
    most the current slice and the next", is gone)."""
    world = start_world(tmp_path, sqlite_url)
    try:

        def ends_now(job: dict[str, Any]) -> dict[str, Any]:
            return {**job, "paidUntil": (utcnow() + timedelta(seconds=1)).isoformat()}

        # The whole 1-hour job takes 10 minutes of the mock's wall clock: it barely moves here.
        hostile_vendor(world, "gpu_vendor_1", ends_now, job_seconds=600.0)
        run_id = world.new_run(budget=5.0, gpu_type="A100", hours=1.0)
        deps = dataclasses.replace(world.deps(), planner=sliced("gpu_vendor_1", 0.1))
        world.deps = lambda **_: deps  # type: ignore[method-assign]

        def paid(state: Any) -> float:
            return sum(p.hours or 0 for p in state.payments if p.status == "completed")

        # Polls, not seconds: before the fix each poll bought a slice (0.6 h in six ticks); 30
        # ticks are far more than that needs on any machine, and far fewer than the work of a
        # slice takes here (it is due again at half a slice's work: 30 s).
        tick_until(world, run_id, lambda state: paid(state) > 0.55, limit_s=20, max_ticks=30)
        state = state_of(world, run_id)
        [job] = state.jobs
        assert job.progress < 0.05, job.progress  # it has run under 3 minutes of its hour
        assert paid(state) <= 0.2 + 1e-9, (
            f"paid {paid(state):.1f} h in advance for a job at {job.progress:.1%} "
            f"(slices of 0.1 h): {[p.hours for p in state.payments]}"
        )
    finally:
        world.stop()


def test_a_fleet_instance_rebooting_after_an_hour_of_work_is_kept(sqlite_url: str) -> None:
    """Before the fix: stuck.py measures "still booting" from when the instance was first seen, not
    from when it began booting: a fleet instance that worked for an hour and then reboots (Vast.ai's
    `rebooting`/`restarting`, a Lambda restart: `booting` again) is terminated at once as a launch
    that never booted, its work lost."""

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(sqlite_url, cloud, min_instances=1) as ctx:
            await scan_for(ctx, 60)  # the fleet launches its minimum; it works for an hour
            first = cloud.launches[0]  # the fleet's own launch (named after its action)
            [launched] = [i for i in cloud.live() if i.name == first]
            cloud.instances_[launched.id] = replace(launched, status="booting")  # a reboot
            await scan_for(ctx, 2)
            acts = [(a.action_type, a.status, a.reason) for a in all_actions(ctx)]
            assert launched.id not in cloud.terminations, (
                f"a rebooting instance terminated within 2 minutes: {acts}"
            )

    asyncio.run(body())


def test_the_agent_buys_no_slice_for_a_job_queued_without_capacity(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: the gateway's paid time runs by the wall clock, queued time included
    (`paidUntil` is set once, when the job first runs), and the agent now renews by it whatever the
    job's status, while a queued job no longer counts as stalling: a preempted job that waits for a
    GPU that never comes is paid for, slice after slice, and never given up."""
    g = start_gateway_world(tmp_path, sqlite_url, command=LONG_JOB)
    run_id = g.world.new_run(budget=5.0, gpu_type="RTX4090", hours=1.0)
    # Slices of 0.05 h: 3 s here (an hour is 60 s).
    deps = dataclasses.replace(g.world.deps(), planner=sliced_planner(0.05), reconsider=None)

    def job() -> Any:
        return state_of(g.world, run_id).jobs[0]

    def bought() -> list[Any]:
        return [p for p in state_of(g.world, run_id).payments if p.status != "failed"]

    async def tick_until(what: Callable[[], bool], limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            await tick(deps, run_id)
            if what():
                return True
            await asyncio.sleep(0.05)
        return False

    async def story() -> tuple[int, int, str]:
        try:
            assert await tick_until(lambda: bool(state_of(g.world, run_id).jobs), 30)
            assert await tick_until(lambda: job().progress > 0.02, 60), job()
            preempt_the_only_gpu(g)  # and no GPU comes back
            vendor_job = job().vendor_job_id
            queued = lambda: job_status(g, vendor_job)["status"] == "queued"  # noqa: E731
            assert await tick_until(queued, 30)
            settled = lambda: all(p.status != "pending" for p in bought())  # noqa: E731
            assert await tick_until(settled, 30)  # a renewal begun before it queued has ended
            before = len(bought())
            # Three slices' worth of wall time with the job queued and no GPU free.
            await tick_until(lambda: len(bought()) > before + 1, 10.0)
            return before, len(bought()), job_status(g, vendor_job)["status"]
        finally:
            await close_deps(deps)

    try:
        before, after, status = asyncio.run(story())
        assert after == before, (
            f"{after - before} slices bought while the job sat {status} without a GPU "
            f"(job {job().status}, progress {job().progress:.0%})"
        )
    finally:
        g.stop()


def test_a_failing_catalogue_read_leaves_the_fleet_scanning(
    sqlite_url: str,
) -> None:
    """Before the fix: the types are now read again every 10 minutes, inside the listing step: when
    that read fails (Vast.ai's offer search rate-limited or down, RunPod's GPU catalogue erroring)
    the whole scan is dropped and backed off, though the instances were listed; for as long as the
    catalogue fails the controller reads no node, renews no dead-man lease and terminates nothing:
    an idle instance bills on, where before the fix (types read once) the fleet went on working."""

    async def body() -> None:
        cloud = FakeCloud()
        idle_a, idle_b = cloud.add(util=5), cloud.add(util=3)
        async with fleet(sqlite_url, cloud, min_instances=1, action_cooldown_mins=0) as ctx:
            await scan_for(ctx, 1)  # the catalogue is read once, then fails from now on
            cloud.fail("types", "provider", times=10_000)
            results = await scan_for(ctx, 45)
            acts = [(a.action_type, a.status) for a in all_actions(ctx)]
            errors = sorted({r.error for r in results if r.error})
            assert {idle_a, idle_b} & set(cloud.terminations), (
                f"45 minutes idle, nothing terminated; actions {acts}; scan errors {errors}"
            )

    asyncio.run(body())
