"""The fleet controller wired for tests: a store, the fake cloud, a manual clock, and helpers to
scan minute by minute."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fleet_fakes import NODE_TOKEN, FakeCloud, ManualClock
from procure.fleet.context import FleetContext
from procure.fleet.controller import ScanResult, scan_once
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.store import fleet_repo, open_store
from procure.store.fleet_tables import ActionRow
from procure.store.ledger import SpendCaps


def settings(cloud: FakeCloud, **overrides: Any) -> FleetSettings:
    values: dict[str, Any] = {
        "node_port": cloud.node_port,
        "node_token": NODE_TOKEN,
        "scan_interval_s": 60,
        "min_instances": 0,
        "dry_run": False,
        **overrides,
    }
    return FleetSettings(**values)


@contextlib.asynccontextmanager
async def fleet(
    db_url: str,
    cloud: FakeCloud,
    *,
    caps: SpendCaps | None = None,
    dry_run: bool = False,
    **overrides: Any,
) -> AsyncIterator[FleetContext]:
    store = open_store(db_url)
    nodes = bounded_client(deadline_s=5)
    ctx = FleetContext(
        store=store,
        cloud=cloud,
        nodes=nodes,
        cfg=settings(cloud, **overrides),
        caps=caps or SpendCaps(),
        clock=ManualClock(),
        dry_run=dry_run,
        slack=True,
    )
    try:
        yield ctx
    finally:
        with store.session() as s:  # as a controller that stops: its fleet no longer runs here
            fleet_repo.release_lease(s, ctx.lease_name, ctx.owner)
        await nodes.aclose()
        cloud.close()
        store.dispose()


async def scan_for(ctx: FleetContext, minutes: int) -> list[ScanResult]:
    """One scan a minute for `minutes` minutes of the controller's clock."""
    results = []
    for _ in range(minutes):
        results.append(await scan_once(ctx))
        ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
    return results


def all_actions(ctx: FleetContext) -> list[ActionRow]:
    with ctx.store.session() as s:
        return list(reversed(fleet_repo.list_actions(s, limit=1000)))


def outbox(ctx: FleetContext, channel: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from procure.store.fleet_tables import OutboxRow

    with ctx.store.session() as s:
        rows = s.scalars(
            select(OutboxRow).where(OutboxRow.channel == channel).order_by(OutboxRow.id)
        )
        return [r.payload for r in rows]
