"""The fleet controller's judgement of the instances it runs: one the cloud
shows active whose node never answers, a Vast.ai status procure does not know, and a listing
that leaves out a live instance once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.clouds.base import Instance
from procure.fleet.controller import scan_once
from procure.fleet.policy import PROVISION, TERMINATE
from procure.store import fleet_repo
from test_fleet_on_runpod_and_vast import fleet as vast_fleet
from test_fleet_on_runpod_and_vast import vast_world


def silence(cloud: FakeCloud, instance_id: str) -> None:
    """The instance's node process dies; the cloud still shows the instance active (and bills)."""
    cloud.nodes[instance_id].server.stop()


def test_a_fleet_instance_active_whose_node_never_answers_is_terminated_and_replaced(
    sqlite_url: str,
) -> None:
    """Before the fix: stuck.py judges only booting and unhealthy instances: a fleet launch the
    cloud shows active but whose node never answers again bills for ever, never terminated nor
    replaced (the pool's one member does no work)."""

    async def body() -> None:
        cloud = FakeCloud()
        # No scale-up on utilisation: the pool is its minimum of one.
        async with fleet(sqlite_url, cloud, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 3)
            [first] = cloud.live()
            assert first.name == cloud.launches[0]
            silence(cloud, first.id)
            await scan_for(ctx, 60)
            acts = [(a.action_type, a.target_instance, a.status) for a in all_actions(ctx)]
            assert first.id in cloud.terminations, (
                f"active, its node silent for an hour (boot timeout 10 min), still billing: {acts}"
            )
            assert (TERMINATE, first.id, "executed") in acts  # audited, through the rails
            working = [i for i in cloud.live() if i.id != first.id and i.status == "active"]
            assert len(working) == 1, f"the pool's minimum was not restored: {cloud.live()}"

    asyncio.run(body())


def test_a_silent_active_instance_in_a_dry_run_is_only_proposed(sqlite_url: str) -> None:
    """Before the fix: nothing at all was proposed for a fleet instance whose node stopped
    answering; once judged, a dry run must record the termination, blocked, and send nothing."""

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(sqlite_url, cloud, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 3)
            [first] = cloud.live()
            silence(cloud, first.id)
            ctx.dry_run = True
            await scan_for(ctx, 30)
            acts = [(a.action_type, a.target_instance, a.block_reason) for a in all_actions(ctx)]
            assert (TERMINATE, first.id, "dry_run") in acts, acts
            assert cloud.terminations == []

    asyncio.run(body())


def test_a_node_that_refuses_a_wrong_fleet_token_is_not_judged_silent(sqlite_url: str) -> None:
    """Guard for the fix above: a node answering 401 (the controller's LAMBDA_LABS_NODE_TOKEN set
    wrong) runs; ending it would end the pool and every replacement, one boot timeout apart."""

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(sqlite_url, cloud, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100, node_token="wrong") as ctx:  # fmt: skip
            await scan_for(ctx, 60)
            acts = [(a.action_type, a.status, a.reason) for a in all_actions(ctx)]
            assert cloud.terminations == [] and len(cloud.launches) == 1, acts

    asyncio.run(body())


def test_a_vast_instance_in_an_unknown_status_whose_node_answers_is_kept(sqlite_url: str) -> None:
    """Before the fix: a Vast.ai status procure does not know reads `unhealthy` with no node
    address, and the fleet terminates the instance after half its boot timeout although it runs:
    a status Vast.ai adds would kill and relaunch every fleet instance in a loop. Its node is what
    tells: one that answers is kept; one that never answers is terminated all the same."""
    mock, cloud = vast_world(boot_s=60)

    def alive() -> list[int]:
        with mock.state.lock:
            now = mock.state.now()
            return [i.id for i in mock.state.instances.values() if not i.ended(now)]

    async def minutes(ctx: object, n: int) -> None:
        for _ in range(n):
            await scan_once(ctx)  # type: ignore[arg-type]
            mock.state.clock.advance(60)

    async def body() -> None:
        async with vast_fleet(
            sqlite_url,
            mock,
            cloud,
            default_instance_type="vast_1x_RTX4090",
            region="California, US",
            min_instances=1,
            max_hourly_spend=100,
            high_gpu_threshold=100,
        ) as ctx:
            await minutes(ctx, 5)
            [first] = alive()
            with ctx.store.session() as s:
                row = fleet_repo.get_instance(s, str(first))
                assert row is not None and row.status == "active"
            with mock.state.lock:
                mock.state.unknown_status = True
            await minutes(ctx, 60)
            with ctx.store.session() as s:
                acts = [(a.action_type, a.status, a.reason) for a in fleet_repo.list_actions(s)]
            assert alive() == [first], f"a running instance in an unknown status ended: {acts}"
            with mock.state.lock:
                mock.state.wrong_ip = True  # and now its node never answers
            await minutes(ctx, 60)
            assert first not in alive(), "unknown status, node silent an hour, still billing"

    try:
        asyncio.run(body())
    finally:
        mock.stop()


@dataclass
class LaggingCloud(FakeCloud):
    """A cloud whose next listing leaves out the instances in `hide` (a lagging or short page)."""

    hide: set[str] = field(default_factory=set)

    async def instances(self) -> list[Instance]:
        listed = await super().instances()
        hidden, self.hide = self.hide, set()
        return [i for i in listed if i.id not in hidden]


def test_an_instance_left_out_of_one_listing_still_counts_against_the_instance_cap(
    db_url: str,
) -> None:
    """Before the fix: one listing that leaves out a live instance ends it in the fleet ledger at
    once; the pool then reads under its minimum, the instance cap counts one fewer, and the fleet
    launches a second instance under a cap of one."""

    async def body() -> None:
        cloud = LaggingCloud()
        async with fleet(db_url, cloud, min_instances=1, max_instances=1,
                         action_cooldown_mins=0, high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 3)
            [first] = cloud.live()
            cloud.hide = {first.id}
            await scan_for(ctx, 5)
            launches = [a for a in all_actions(ctx) if a.action_type == PROVISION]
            assert len(cloud.live()) == 1, (
                f"{len(cloud.live())} instances under a cap of 1 after one short listing: "
                f"{[(a.status, a.reason) for a in launches]}"
            )
            with ctx.store.session() as s:
                [row] = fleet_repo.live_instances(s)
            assert row.instance_id == first.id

    asyncio.run(body())


def test_an_instance_gone_from_two_listings_is_ended_in_the_ledger(sqlite_url: str) -> None:
    """Guard for the fix above: an instance that really went (missing from two listings) stops
    billing in the ledger and the pool is brought back to its minimum."""

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(sqlite_url, cloud, min_instances=1, max_instances=1,
                         action_cooldown_mins=0, high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 3)
            [first] = cloud.live()
            await cloud.terminate([first.id])  # ended behind the fleet's back
            await scan_for(ctx, 3)
            with ctx.store.session() as s:
                row = fleet_repo.get_instance(s, first.id)
                assert row is not None and row.ended_at is not None
            assert len(cloud.live()) == 1 and cloud.live()[0].id != first.id

    asyncio.run(body())


def test_an_instance_gone_is_ended_when_each_scan_is_a_new_process(sqlite_url: str) -> None:
    """Guard for the fix above: `procure fleet run --once` from a scheduler is a new process each
    scan: the grace a missing instance gets must not depend on the process's memory, or an
    instance that went would bill in the ledger (and fill the caps) for ever."""

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(sqlite_url, cloud, min_instances=1, max_instances=1,
                         action_cooldown_mins=0, high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 3)
            [first] = cloud.live()
            await cloud.terminate([first.id])
            for _ in range(3):
                fresh = replace(ctx, status_since={}, types={}, types_at=None)
                await scan_for(fresh, 1)
            with ctx.store.session() as s:
                row = fleet_repo.get_instance(s, first.id)
                assert row is not None and row.ended_at is not None
            assert len(cloud.live()) == 1 and cloud.live()[0].id != first.id

    asyncio.run(body())


def test_a_launch_stuck_booting_is_terminated_when_each_scan_is_a_new_process(
    sqlite_url: str,
) -> None:
    """Before the fix: stuck.py keeps when an instance stopped working in the process's memory; a
    new process (`procure fleet run --once` from a scheduler) times a launch from its launch only
    while that is within the boot timeout, else from now: past the deadline, every scan restarts
    its clock, and a launch that never boots bills for ever."""

    async def body() -> None:
        cloud = FakeCloud(boot_scans=10_000)  # the launch never comes up
        async with fleet(sqlite_url, cloud, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100) as ctx:  # fmt: skip
            for _ in range(40):
                fresh = replace(ctx, status_since={}, types={}, types_at=None)
                await scan_for(fresh, 1)
            acts = [(a.action_type, a.status, a.reason) for a in all_actions(ctx)]
            first = next(i for i in cloud.instances_.values() if i.name == cloud.launches[0])
            assert first.id in cloud.terminations, f"booting 40 min (deadline 10): {acts}"

    asyncio.run(body())


def test_a_silent_instance_is_terminated_when_each_scan_is_a_new_process(db_url: str) -> None:
    """Before the fix: the same for a fleet instance whose node stopped answering after it had
    worked: each new process timed its silence from now, and it billed for ever."""

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(db_url, cloud, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 20)
            [first] = cloud.live()
            silence(cloud, first.id)
            for _ in range(40):
                fresh = replace(ctx, status_since={}, types={}, types_at=None)
                await scan_for(fresh, 1)
            acts = [(a.action_type, a.status, a.reason) for a in all_actions(ctx)]
            assert first.id in cloud.terminations, f"silent 40 min (deadline 10): {acts}"

    asyncio.run(body())


class NodelessCloud(FakeCloud):
    """Instances without procure's GPU node: the operator runs its own image, nothing answers
    on the node's port."""

    def _start(self, name: str | None, util: int) -> str:
        instance_id = super()._start(name, util)
        silence(self, instance_id)
        return instance_id


def test_a_fleet_whose_nodes_never_answered_does_not_end_its_instances_for_silence(
    sqlite_url: str,
) -> None:
    """Before the fix: silence was judged on every fleet instance, so an operator running no
    GPU node (its own image; figures read neither from nodes nor Prometheus) had each instance
    terminated as "active, its node silent" one boot timeout after launch, and, with a minimum,
    replaced by another that met the same end: a new instance's boot billed every ten minutes,
    for ever. Silence says something only in a fleet where some node has answered."""

    async def body() -> None:
        cloud = NodelessCloud()
        async with fleet(sqlite_url, cloud, min_instances=1, boot_timeout_mins=10,
                         high_gpu_threshold=100) as ctx:  # fmt: skip
            await scan_for(ctx, 60)
            acts = [(a.action_type, a.status, a.reason) for a in all_actions(ctx)]
            assert cloud.terminations == [] and len(cloud.launches) == 1, acts

    asyncio.run(body())
