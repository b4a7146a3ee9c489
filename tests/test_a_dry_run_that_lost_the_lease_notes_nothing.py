"""A dry-run fleet controller whose lease a live one took mid-scan writes nothing of its scan
onto the fleet's record: `fleet status` (its `controller`: owner, last scan, last error), the
clock offset approvals' expiry is judged on, and the backoff stay the live controller's. Real
controllers over a real store (SQLite and PostgreSQL) and the fleet tests' fake cloud."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fleet_fakes import FakeCloud
from fleet_world import fleet
from procure.clouds.base import Instance, ProviderError
from procure.fleet.controller import scan_once
from procure.fleet.summary import summary
from procure.models import utcnow
from procure.store import fleet_repo


@dataclass
class _StalledCloud(FakeCloud):
    """The dry run's view of the cloud: its listing waits until told, then fails."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    listing: asyncio.Event = field(default_factory=asyncio.Event)

    async def instances(self) -> list[Instance]:
        self.listing.set()
        await self.gate.wait()
        raise ProviderError("the dry run's listing timed out")


def test_a_dry_run_that_lost_the_lease_mid_scan_leaves_the_live_ones_record(db_url: str) -> None:
    """Before the fix: the dry run's failed listing, answered after a live controller had
    taken the lease and scanned, was noted on the fleet's record all the same: `fleet status`
    showed the live controller as owner with the dry run's error, its last scan moved back to
    the dry run's start, and the dry run's backoff."""

    async def body() -> None:
        cloud = FakeCloud()
        stalled = _StalledCloud()
        async with (
            fleet(db_url, stalled, dry_run=True) as dry,
            fleet(db_url, cloud) as live,
        ):
            live.clock.advance(seconds=30)  # type: ignore[attr-defined]
            rehearsal = asyncio.ensure_future(scan_once(dry))
            await asyncio.wait_for(stalled.listing.wait(), 30)
            assert (await scan_once(live)).leased  # taken from the dry run mid-scan
            stalled.gate.set()
            failed = await asyncio.wait_for(rehearsal, 30)
            assert failed.error is not None and "timed out" in failed.error
            with live.store.session() as s:
                row = fleet_repo.lease_row(s, live.lease_name)
                assert row is not None
                said = summary(s, live.cfg, utcnow())["controller"]
                assert (row.owner, row.dry_run) == (live.owner, False)
                assert row.backoff_until is None
            assert said["owner"] == live.owner
            assert said["last_error"] is None, said
            # The live scan's, on its clock (30 s ahead of the dry run's): the offset approvals
            # are judged by is the one noted with it.
            assert said["last_scan_at"] == live.clock().isoformat()  # type: ignore[attr-defined]

    asyncio.run(body())
