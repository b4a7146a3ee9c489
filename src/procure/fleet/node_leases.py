"""Where the controller's nodes answer, and its dead-man leases on them (`POST /lease`): renewed
on each node read, and kept up while the cloud's listing fails. A node whose lease lapses stops
its instance; that is for a controller that died, not for one whose cloud API is down a while (a
listing that fails, and the scans backing off after it, read no node)."""

from __future__ import annotations

import asyncio
from typing import cast

from procure.clouds.base import Instance, InstanceStatus
from procure.fleet import nodes
from procure.fleet.context import FleetContext
from procure.store import fleet_repo
from procure.store.fleet_tables import FleetInstanceRow

CONCURRENCY = 16


def where(ctx: FleetContext) -> tuple[int, str | None]:
    """The nodes' port (0: where the cloud maps it) and token."""
    return (0 if ctx.mapped_ports else ctx.cfg.node_port), ctx.node_token


def address(ctx: FleetContext, i: Instance) -> str | None:
    """Where the fleet reads `i`'s node (`nodes.node_url`: checked to be the instance's own
    address), recorded on its row for the Nodes page, which sends the node token there and
    nowhere else. None while the listing gives no such address."""
    port, _token = where(ctx)
    return nodes.node_url(i, port)


async def renew(ctx: FleetContext, i: Instance) -> None:
    """Renew the lease on `i`'s node. A dry run keeps up what the live fleet holds, but takes no
    lease of its own: one it took would, once it ends, fire the node's stop action
    (GPU_WORKER_ON_ORPHAN) on an instance no live controller ever held."""
    port, token = where(ctx)
    if not ctx.dry_run or await nodes.holds_lease(ctx.nodes, i, port, token, ctx.node_holder):
        await nodes.renew_lease(ctx.nodes, i, port, token, ctx.node_holder, ctx.cfg.node_lease_s)


async def keep_up(ctx: FleetContext) -> None:
    """Renew the leases of the nodes the last listing's scan renewed, while no listing comes:
    without it, a cloud API down for a node lease (LAMBDA_LABS_NODE_LEASE_S) had every node stop
    its instance under a controller that runs. Only those the ledger still has live: one the
    fleet has ended may be someone else's machine now, and the token goes to its own node only.
    A process that has read no node yet (`fleet run --once`, a new process each scan) renews
    those the ledger has running at their recorded address (where the node's port is the
    fleet's: a mapped port is known from a listing only)."""
    with ctx.store.session() as s:
        live = fleet_repo.live_instances(s)
        known = {r.instance_id for r in live}
        nodes_of = [i for i in ctx.leased.values() if i.id in known]
        if not ctx.leased and not ctx.mapped_ports:
            nodes_of = [_instance(r) for r in live if r.ip and r.status in READABLE]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(i: Instance) -> None:
        async with limit:
            await renew(ctx, i)

    await asyncio.gather(*(one(i) for i in nodes_of))


READABLE = ("active", "unhealthy")  # listed so, an instance's node is read (and leased)


def _instance(r: FleetInstanceRow) -> Instance:
    status = cast(InstanceStatus, r.status)  # one of READABLE
    return Instance(r.instance_id, r.name, status, r.instance_type, r.region, r.ip, 0)
