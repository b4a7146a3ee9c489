"""A controller killed after the cloud terminated a duplicate launch, before it recorded that,
still leaves the termination in the audit trail: the clean-up is recorded (in flight) before
the cloud is called, and the restarted controller finishes it, exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, outbox, scan_for
from procure.clouds.base import Instance
from procure.fleet.policy import PROVISION, TERMINATE


class Crash(BaseException):
    """A kill: not an Exception, so nothing on the way up catches it."""


@dataclass
class DiesAfterTerminating(FakeCloud):
    """The cloud terminates as asked; the controller dies before the answer is handled, once."""

    armed: bool = False

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        done = await super().terminate(instance_ids)
        if self.armed:
            self.armed = False
            raise Crash("killed after the cloud terminated")
        return done


def test_a_duplicate_terminated_just_before_a_kill_is_audited_once(db_url: str) -> None:
    """Before the fix: the duplicate was terminated first and recorded after; killed between,
    the restarted controller saw it terminating (no longer a live twin) and never recorded it:
    an instance procure terminated with no action, no audit entry and no Slack message."""

    async def body() -> None:
        cloud = DiesAfterTerminating()
        async with fleet(db_url, cloud, min_instances=1, max_instances=1) as ctx:
            await scan_for(ctx, 1)  # its minimum: one launch
            (launch,) = [a for a in all_actions(ctx) if a.action_type == PROVISION]
            # Its lost answer landed twice (Lambda's launch has no idempotency key).
            twin = cloud._start(launch.action_id, 95)
            cloud.armed = True
            with pytest.raises(Crash):
                await scan_for(ctx, 1)
            assert cloud.terminations == [twin]
            # The restarted controller knows only the store (and the cloud).
            again = dataclasses.replace(ctx, types={}, cloud_failures=0, backoff_until=None)
            await scan_for(again, 2)
            ended = [a for a in all_actions(again) if a.action_type == TERMINATE]
            assert [(a.target_instance, a.status) for a in ended] == [(twin, "executed")]
            audited = [
                e["action"]["target"]
                for e in outbox(again, "audit")
                if e.get("action", {}).get("type") == TERMINATE
            ]
            assert audited == [twin]
            assert cloud.terminations == [twin]

    asyncio.run(body())
