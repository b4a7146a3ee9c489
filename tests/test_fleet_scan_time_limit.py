"""A fleet scan has an overall time limit (`FLEET_SCAN_TIMEOUT_S`, by default a few fleet leases):
one whose cloud call hangs is abandoned there, acts on nothing more, lets the fleet lease go (a
controller standing by may take it) and says why; the next scan starts afresh and finishes what
the abandoned one had begun, once. Real controller and store; the cloud is the fleet tests' fake,
made to hang."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet
from procure.clouds.base import Instance
from procure.fleet.controller import scan_once
from procure.fleet.settings import FleetSettings
from procure.models import utcnow
from procure.store import fleet_repo

LIMIT_S = 8.0  # far above a normal scan of this small fleet, even on a loaded machine
HANG_S = 120.0  # a hang that outlasts the test if nothing cuts it (then it fails, not hangs)


@dataclass
class HangingCloud(FakeCloud):
    """The fake cloud whose calls named in `hang` never answer: `instances` before listing, and
    `launch` after the instance landed (its answer lost, as a connection that stalls)."""

    hang: set[str] = field(default_factory=set)

    async def _stall(self, op: str) -> None:
        if op in self.hang:
            await asyncio.wait_for(asyncio.Event().wait(), HANG_S)

    async def instances(self) -> list[Instance]:
        await self._stall("instances")
        return await super().instances()

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        ids = await super().launch(
            instance_type=instance_type,
            region=region,
            name=name,
            ssh_key_names=ssh_key_names,
            max_price_per_hour=max_price_per_hour,
        )
        await self._stall("launch")
        return ids


def test_a_scan_whose_cloud_hangs_is_abandoned_and_the_lease_let_go(sqlite_url: str) -> None:
    """Before the fix: a scan had no overall limit and its lease was renewed while it ran, so a
    cloud listing that never answered held the fleet for ever: no scan ended, nobody acted, and a
    controller standing by could never take over."""

    async def body() -> None:
        cloud = HangingCloud(hang={"instances"})
        cloud.add(util=50)
        async with fleet(sqlite_url, cloud, scan_timeout_s=LIMIT_S) as ctx:
            result = await scan_once(ctx)
            assert result.error is not None and "scan abandoned after 8s" in result.error
            with ctx.store.session() as s:
                lease = fleet_repo.lease_row(s, ctx.lease_name)
                assert lease is not None and lease.last_error == result.error  # fleet status
                # Let go: a controller standing by takes the fleet at once.
                assert fleet_repo.take_lease(s, ctx.lease_name, "standby", 60, utcnow())
                fleet_repo.release_lease(s, ctx.lease_name, "standby")
            cloud.hang.clear()  # the cloud answers again: the next scan starts afresh
            again = await scan_once(ctx)
            assert again.error is None and again.instances == 1

    asyncio.run(body())


def test_a_launch_cut_by_the_limit_is_finished_by_the_next_scan_once(sqlite_url: str) -> None:
    """The abandoned scan acts on nothing more; the launch it had begun (landed, its answer
    lost) is found by name by the next scan, never launched twice."""

    async def body() -> None:
        cloud = HangingCloud(hang={"launch"})
        async with fleet(sqlite_url, cloud, min_instances=1, scan_timeout_s=LIMIT_S) as ctx:
            result = await scan_once(ctx)
            assert result.error is not None and "scan abandoned" in result.error
            assert len(cloud.launches) == 1
            cloud.hang.clear()
            for _ in range(3):
                assert (await scan_once(ctx)).error is None
                ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
            assert len(cloud.launches) == 1 and len(cloud.live()) == 1
            acts = [(a.action_type, a.status) for a in all_actions(ctx)]
            assert acts == [("provision_instance", "executed")], acts

    asyncio.run(body())


def test_the_scan_limit_setting() -> None:
    assert FleetSettings(_env_file=None).scan_limit_s == 5 * 120.0  # a few leases by default
    lease = FleetSettings(_env_file=None, LAMBDA_LABS_CONTROLLER_LEASE_S=30)
    assert lease.scan_limit_s == 150.0
    assert FleetSettings(_env_file=None, FLEET_SCAN_TIMEOUT_S="45").scan_limit_s == 45.0
    assert FleetSettings(_env_file=None, FLEET_SCAN_TIMEOUT_S=" ").scan_limit_s == 600.0
    for bad in ("0", "-1", "nan", "inf"):
        try:
            FleetSettings(_env_file=None, FLEET_SCAN_TIMEOUT_S=bad)
        except ValueError:
            continue
        raise AssertionError(f"FLEET_SCAN_TIMEOUT_S={bad} was taken")
