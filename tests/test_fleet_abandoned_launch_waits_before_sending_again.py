"""A launch cut by the scan's time limit (FLEET_SCAN_TIMEOUT_S) is an answer lost, like one past
its own timeout: the action waits its back-off before it is sent again, so a controller that
takes the fleet the moment the abandoned scan lets it go does not launch a second instance while
the cloud is still making the first. Real controllers and store; the cloud is the fleet tests'
fake, slow to make what it was asked for."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet
from procure.fleet.controller import scan_once

LIMIT_S = 8.0  # far above a normal scan of this small fleet, even on a loaded machine
HANG_S = 120.0  # a hang that outlasts the test if nothing cuts it (then it fails, not hangs)


@dataclass
class SlowCloud(FakeCloud):
    """A cloud that takes a launch and does not answer while `stall`; what it took is listed
    only once `land` is called (the request reached it: it makes the instance all the same)."""

    stall: bool = True
    taken: list[str] = field(default_factory=list)

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        self.launches.append(name)
        if self.stall:
            self.taken.append(name)
            await asyncio.wait_for(asyncio.Event().wait(), HANG_S)
        return [await asyncio.to_thread(self._start, name, 95)]

    def land(self) -> None:
        for name in self.taken:
            self._start(name, 95)
        self.taken.clear()


def test_a_controller_taking_over_an_abandoned_launch_does_not_send_it_again_at_once(
    sqlite_url: str,
) -> None:
    """Before the fix: the abandoned scan's launch was left `executing` with no back-off and
    the lease let go, so the controller standing by took the fleet at once, did not find the
    instance by name (the cloud was still making it) and launched it again: two instances
    billed for one decision."""

    async def body() -> None:
        cloud = SlowCloud()
        async with (
            fleet(sqlite_url, cloud, min_instances=1, scan_timeout_s=LIMIT_S) as first,
            fleet(sqlite_url, cloud, min_instances=1, scan_timeout_s=LIMIT_S) as standby,
        ):
            standby.clock = first.clock  # one time for both controllers
            result = await scan_once(first)
            assert result.error is not None and "scan abandoned" in result.error
            assert cloud.launches and len(cloud.launches) == 1
            cloud.stall = False
            # The standby takes the fleet at once (the abandoned scan let it go).
            taken = await scan_once(standby)
            assert taken.leased, taken
            assert len(cloud.launches) == 1, cloud.launches  # not sent again yet
            cloud.land()  # the cloud made what it was first asked for
            for _ in range(4):
                first.clock.advance(minutes=2)  # type: ignore[attr-defined]
                assert (await scan_once(standby)).error is None
            assert len(cloud.launches) == 1 and len(cloud.live()) == 1, cloud.launches
            acts = [(a.action_type, a.status) for a in all_actions(standby)]
            assert acts == [("provision_instance", "executed")], acts

    asyncio.run(body())
