"""The fleet destroys only launches the cloud lost for good (not those paused or stopped), as
each cloud says their disks bill; a long scan keeps its lease, and one that lost it acts on
nothing; a dry run leaves a live fleet's approved actions alone. Real controller and store."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import httpx

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.mockstate import Machine
from procure.fleet import actions
from procure.fleet.context import FleetContext
from procure.fleet.controller import run_controller, scan_once
from procure.models import utcnow
from procure.store import fleet_repo
from test_fleet_on_runpod_and_vast import fleet as cloud_fleet
from test_fleet_on_runpod_and_vast import runpod_world, vast_world
from test_fleet_signal import Queue

DEADLINE_S = 60.0  # generous: each wait below is for a condition, not a duration


async def _until(done: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not done():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(what) from None


def _acts(ctx: FleetContext) -> list[tuple[str, str | None, str, str]]:
    return [(a.action_type, a.target_instance, a.status, a.reason) for a in all_actions(ctx)]


async def _minutes(ctx: FleetContext, mock: Any, n: int) -> None:
    for _ in range(n):
        await scan_once(ctx)
        mock.state.clock.advance(60)


# --- Vast.ai: paused or stopped is not lost ---------------------------------------------------


class StoppedOnVast(httpx.AsyncHTTPTransport):
    """Vast.ai's answers as the mock gives them, but the instances in `stopped` listed as Vast.ai
    lists a stopped instance (`actual_status`, `intended_status`; vast-ai/docs show-instance):
    paused by Vast.ai for an unpaid balance (it meant to run), stopped by the operator, or its
    container exited (the docs' poll trap: it never runs again)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: dict[int, tuple[str, str]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if request.method != "GET" or not request.url.path.startswith("/api/v1/instances"):
            return response
        body = json.loads(await response.aread())
        for raw in body.get("instances") or []:
            if raw.get("id") in self.stopped:
                actual, intended = self.stopped[raw["id"]]
                raw |= {"actual_status": actual, "intended_status": intended, "ports": None,
                        "cur_state": "stopped", "next_state": "stopped"}  # fmt: skip
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))}
        return httpx.Response(response.status_code, headers=headers, stream=httpx.ByteStream(data))


def test_vast_fleet_launches_paused_for_their_balance_or_stopped_by_the_operator_keep_their_disk(
    sqlite_url: str,
) -> None:
    """Before the fix: the clean-up destroyed every fleet launch Vast.ai listed as not running
    for a boot timeout, as lost: one Vast.ai paused when the account's balance ran out (Vast.ai
    stops it and keeps its disk, to resume) and one the operator stopped (`intended_status`
    stopped) were destroyed with their disks, like the one whose container exited (which never
    runs again, and is rightly destroyed)."""
    machines = [Machine(7_600_000 + n, "RTX 4090", 1, "California, US", 0.40) for n in range(8)]
    transport = StoppedOnVast()
    mock, cloud = vast_world(transport=transport, boot_s=60, machines=machines)

    def destroyed(instance_id: int) -> bool:
        with mock.state.lock:
            return mock.state.instances[instance_id].destroyed_at is not None

    async def body() -> None:
        async with cloud_fleet(sqlite_url, mock, cloud, default_instance_type="vast_1x_RTX4090",
                               region="California, US", min_instances=3, max_hourly_spend=100,
                               high_gpu_threshold=100, boot_timeout_mins=10,
                               action_cooldown_mins=0) as ctx:  # fmt: skip
            await _minutes(ctx, mock, 5)
            unpaid, stopped, exited = sorted(mock.state.instances)
            transport.stopped |= {
                unpaid: ("stopped", "running"),  # paused by Vast.ai: the balance ran out
                stopped: ("stopped", "stopped"),  # stopped by the operator
                exited: ("exited", "running"),  # its container exited: lost for good
            }
            await _minutes(ctx, mock, 60)
            acts = _acts(ctx)
            assert len(mock.state.instances) == 6, acts  # each replaced, as before
            assert not destroyed(unpaid), f"paused for its balance, destroyed with its disk: {acts}"
            assert not destroyed(stopped), f"stopped by the operator, destroyed: {acts}"
            assert destroyed(exited), f"lost for good, left billing its disk: {acts}"

    try:
        asyncio.run(body())
    finally:
        mock.stop()


# --- RunPod: a stopped pod is not lost ---------------------------------------------------------


def test_a_runpod_fleet_pod_that_was_stopped_keeps_its_disk(sqlite_url: str) -> None:
    """Before the fix: the clean-up deleted a fleet pod RunPod listed EXITED for a boot timeout,
    as lost. RunPod REST v2 lists every stopped pod EXITED (the operator's stop, the platform's for
    a balance at zero) and does not say who stopped it; a stopped pod keeps its disk and resumes
    on its host (`start`): deleting it deleted the operator's disk."""
    mock, cloud = runpod_world()

    async def body() -> None:
        async with cloud_fleet(sqlite_url, mock, cloud, default_instance_type="SECURE:NVIDIA A40",
                               region="EU-RO-1", min_instances=1, max_hourly_spend=100,
                               high_gpu_threshold=100, boot_timeout_mins=10,
                               action_cooldown_mins=0) as ctx:  # fmt: skip
            await _minutes(ctx, mock, 5)
            with mock.state.lock:
                (pod,) = list(mock.state.pods.values())
            mock.state.preempt(pod.id)  # stopped: RunPod lists it EXITED
            await _minutes(ctx, mock, 60)
            acts = _acts(ctx)
            with mock.state.lock:
                assert not pod.deleted, f"a stopped pod was deleted with its disk: {acts}"
                assert len(mock.state.pods) == 2, acts  # replaced, as before

    try:
        asyncio.run(body())
    finally:
        mock.stop()


# --- each cloud says whether a lost instance bills its disk -----------------------------------


@dataclass
class GoneWithItsDisk(FakeCloud):
    """The fleet tests' fake cloud, as a cloud whose lost instance is gone with its disk."""

    lost_bills_disk: bool = False


def test_each_cloud_says_whether_a_lost_instance_bills_its_disk(sqlite_url: str) -> None:
    """Before the fix: no cloud client said whether an instance it lost bills its disk; the
    clean-up guessed it from `getattr(cloud, "provider", None) == "lambda"`, so a cloud whose
    lost instance is gone with its disk but is not named "lambda" had it terminated again (and
    a termination audited and announced) for nothing."""
    assert (LambdaCloud.lost_bills_disk, RunPodCloud.lost_bills_disk) == (False, True)
    assert VastCloud.lost_bills_disk is True

    async def body() -> None:
        gone = GoneWithItsDisk()
        async with fleet(sqlite_url, gone, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100, action_cooldown_mins=0) as ctx:  # fmt: skip
            await scan_for(ctx, 3)
            (first,) = list(gone.instances_)
            gone.instances_[first] = replace(gone.instances_[first], status="preempted")
            await scan_for(ctx, 60)
            assert gone.terminations == [], _acts(ctx)
            assert len(gone.launches) == 2  # replaced, as before

    asyncio.run(body())


# --- a fleet lease under a long scan -----------------------------------------------------------

QUEUED = [{"gpus": 1, "waitingS": 900}]  # one job waiting: procure's policy launches for it
# Procure's policy as the fleet benchmark runs it (no cooldown); a lease of seconds.
LEASED: dict[str, Any] = {"policy": "procure", "queue_wait_target_min": 0, "queue_timeout_s": 10,
                          "action_cooldown_mins": 0, "lease_s": 3}  # fmt: skip


class SlowCatalogue:
    """The fleet's account as one controller reaches it: the catalogue it reads again once jobs
    queue (procure's policy, deciding a launch) answers only when the test lets it. `stall`: the
    wait blocks the controller's whole process (its event loop), as a process paused does."""

    def __init__(self, account: FakeCloud, *, stall: bool = False) -> None:
        self.account, self.stall = account, stall
        self.calls = 0
        self.asked, self.answer = threading.Event(), threading.Event()

    async def instance_types(self) -> list[Any]:
        self.calls += 1
        if self.calls > 1:  # the first is the scan's listing; the next, the policy's
            self.asked.set()
            if self.stall:
                self.answer.wait(DEADLINE_S)
            else:
                await _until(self.answer.is_set, "the catalogue was never let answer")
        return await self.account.instance_types()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.account, name)


def _expiry(ctx: FleetContext) -> datetime | None:
    with ctx.store.session() as s:
        lease = fleet_repo.lease_row(s, ctx.lease_name)
    return None if lease is None else lease.expires_at


def _lapsed(ctx: FleetContext) -> bool:
    expires = _expiry(ctx)
    return expires is not None and expires < utcnow()


def test_a_scan_waiting_on_a_slow_cloud_keeps_the_fleet_and_launches_once(db_url: str) -> None:
    """Before the fix: the fleet lease was taken at a scan's start and not renewed while it ran:
    a scan waiting on a slow cloud past its lease lost the fleet to another controller
    (`fleet run --once` from a scheduler), which launched for the queued job and let the lease go;
    the slow scan then took the free lease again and launched for the same job on what it had
    decided before: two instances billed for one job."""
    queue = Queue()
    queue.jobs = QUEUED

    async def body() -> None:
        account = FakeCloud()
        slow = SlowCatalogue(account)
        async with (
            fleet(db_url, slow, queue_url=queue.url, **LEASED) as first,  # type: ignore[arg-type]
            fleet(db_url, account, queue_url=queue.url, **LEASED) as second,
        ):
            scan = asyncio.ensure_future(scan_once(first))
            await _until(slow.asked.is_set, "the first controller never decided")
            taken = _expiry(first)  # the lease as the slow scan holds it now
            assert taken is not None
            await _until(lambda: utcnow() > taken, "the lease's time never passed")
            beside = await scan_once(second)  # the second controller's run meanwhile
            with second.store.session() as s:  # as `--once` ends
                fleet_repo.release_lease(s, second.lease_name, second.owner)
            slow.answer.set()
            result = await asyncio.wait_for(scan, DEADLINE_S)
            acts = _acts(first)
            assert len(account.launches) == 1, f"one job, launched twice: {acts}"
            assert not beside.leased, f"the second controller took a live scan's fleet: {acts}"
            assert result.leased and len(result.carried_out) == 1, (result, acts)

    try:
        asyncio.run(body())
    finally:
        queue.stop()


def test_a_controller_stalled_past_its_lease_acts_on_nothing_it_decided(db_url: str) -> None:
    """Before the fix: a controller whose process stalled past its fleet lease in the middle of a
    scan (paused, its event loop blocked) checked the lease again before acting by taking it,
    which succeeds on a lease that lapsed: another controller had taken it meanwhile, launched for
    the queued job and let it go (`fleet run --once`), and the stalled one, resumed, launched for
    the same job on what it had decided before the stall: two instances billed for one job."""
    queue = Queue()
    queue.jobs = QUEUED
    account = FakeCloud()
    slow = SlowCatalogue(account, stall=True)
    beside: list[Any] = []

    def second_controller() -> None:  # another process, in effect: its own thread and loop
        async def run() -> str | None:
            async with fleet(db_url, account, queue_url=queue.url, **LEASED) as second:
                deadline = time.monotonic() + DEADLINE_S
                while not (slow.asked.is_set() and _lapsed(second)):
                    assert time.monotonic() < deadline, "the first controller's lease never lapsed"
                    await asyncio.sleep(0.02)
                return await run_controller(second, once=True)

        try:
            beside.append(asyncio.run(run()))
        except BaseException as exc:
            beside.append(exc)
        finally:
            slow.answer.set()

    async def body() -> None:
        stalling = fleet(db_url, slow, queue_url=queue.url, **LEASED)  # type: ignore[arg-type]
        async with stalling as first:
            thread = threading.Thread(target=second_controller)
            thread.start()
            result = await asyncio.wait_for(scan_once(first), DEADLINE_S)
            thread.join(DEADLINE_S)
            acts = _acts(first)
            assert beside == [None], beside  # the second ran, and launched for the job
            assert len(account.launches) == 1, f"one job, launched twice: {acts}"
            assert not result.leased and result.carried_out == [], (result, acts)

    try:
        asyncio.run(body())
    finally:
        queue.stop()


# --- a dry run beside a live fleet -------------------------------------------------------------


def test_a_dry_run_leaves_an_approved_rollback_to_the_live_controller(sqlite_url: str) -> None:
    """Before the fix: a dry-run scan (`procure fleet run --once`, the README's look at what the
    fleet would do) run while the live controller was between scans (`--once --live` from a
    scheduler lets its lease go) passed a person's approved rollback through its rails, whose dry
    run rail blocked it for good: the live controller never carried it out, and the instance the
    operator rolled back went on billing."""

    async def body() -> None:
        cloud = FakeCloud()
        async with (
            fleet(sqlite_url, cloud, min_instances=1) as live,
            fleet(sqlite_url, cloud, min_instances=1, dry_run=True) as dry,
        ):
            await scan_for(live, 2)
            (launch,) = all_actions(live)
            (instance,) = list(cloud.instances_)
            with live.store.session() as s:  # the live run ends, its lease let go
                fleet_repo.release_lease(s, live.lease_name, live.owner)
            back = actions.rollback(live.store, launch.action_id, "ops", live.clock())
            assert await run_controller(dry, once=True) is None  # a look, the lease being free
            assert cloud.terminations == []
            await scan_once(live)  # the live controller's next run
            assert cloud.terminations == [instance], _acts(live)
            with live.store.session() as s:
                done = fleet_repo.get_action(s, back.action_id)
                assert done is not None and done.status == "executed", _acts(live)

    asyncio.run(body())
