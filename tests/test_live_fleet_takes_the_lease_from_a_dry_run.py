"""A dry-run fleet controller (the default, and the README's first look at the fleet) never keeps
a live one from running the fleet: a live controller started beside it takes the fleet's lease
from it and acts; the dry run then stands by, as any controller beside a live one does, and
`procure fleet run --once` beside a live fleet says so, as before. Real controllers over a real
store (SQLite and PostgreSQL) and the fleet tests' fake cloud."""

from __future__ import annotations

import asyncio
import contextlib
import io

from rich.console import Console

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet
from procure.cli import fleet as fleet_cli
from procure.fleet.controller import scan_once
from procure.fleet.summary import summary
from procure.models import utcnow
from procure.store import fleet_repo


def _holder(ctx) -> tuple[str | None, bool]:  # type: ignore[no-untyped-def]
    """Who holds the fleet's lease, and whether a dry run, as `fleet status` says it."""
    with ctx.store.session() as s:
        row = fleet_repo.lease_row(s, ctx.lease_name)
        said = summary(s, ctx.cfg, utcnow())["controller"]
    assert row is not None
    assert (said["owner"], said["dry_run"]) == (row.owner, row.dry_run)
    return row.owner, row.dry_run


def test_a_live_controller_started_beside_a_dry_run_acts(db_url: str) -> None:
    """Before the fix: the dry run held the fleet's lease (renewed every scan), so a live
    controller started after it stood by, scan after scan, and never launched the fleet's
    minimum: the operator's `--live` did nothing while the rehearsal ran."""

    async def body() -> None:
        cloud = FakeCloud()
        async with (
            fleet(db_url, cloud, min_instances=1, dry_run=True) as dry,
            fleet(db_url, cloud, min_instances=1) as live,
        ):
            first = await scan_once(dry)
            assert first.leased and cloud.launches == []
            assert _holder(dry) == (dry.owner, True)
            for _ in range(3):  # both running, minute by minute: the dry run scans first
                await scan_once(dry)
                result = await scan_once(live)
                assert result.leased, "the live controller stood by beside a dry run"
                dry.clock.advance(minutes=1)  # type: ignore[attr-defined]
                live.clock.advance(minutes=1)  # type: ignore[attr-defined]
            assert len(cloud.launches) == 1, (cloud.launches, all_actions(live))
            assert _holder(live) == (live.owner, False)
            # The dry run stands by beside the live one: it neither takes the lease back nor
            # rehearses beside it.
            again = await scan_once(dry)
            assert not again.leased and _holder(live) == (live.owner, False)
            # A live controller holds against another live one, as before.
            async with fleet(db_url, cloud, min_instances=1) as second:
                assert not (await scan_once(second)).leased
            assert _holder(live) == (live.owner, False)
            # The live one stops: the dry run rehearses again.
            with live.store.session() as s:
                fleet_repo.release_lease(s, live.lease_name, live.owner)
            assert (await scan_once(dry)).leased
            assert len(cloud.launches) == 1

    asyncio.run(body())


def test_a_dry_run_once_beside_a_live_fleet_says_it_did_nothing(db_url: str) -> None:
    """`procure fleet run --once` (a dry run) beside a live fleet says what it said before:
    another controller holds the lease, and this scan did nothing."""

    async def body() -> str:
        cloud = FakeCloud()
        async with (
            fleet(db_url, cloud, min_instances=1) as live,
            fleet(db_url, cloud, min_instances=1, dry_run=True) as dry,
        ):
            assert (await scan_once(live)).leased
            out = io.StringIO()
            with contextlib.ExitStack() as stack:
                stack.callback(setattr, fleet_cli, "console", fleet_cli.console)
                fleet_cli.console = Console(file=out, width=200)
                assert await fleet_cli._scan_and_say(dry) is None
            assert _holder(live) == (live.owner, False)
            return out.getvalue()

    said = asyncio.run(body())
    assert "another controller holds the fleet lease: this scan did nothing" in said
