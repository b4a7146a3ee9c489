"""What the controller cleans up on its own, announced like any executed action and not paced by
the cooldowns: the duplicates a lost launch answer left (Lambda), and the fleet's launches the
cloud has lost for good, which bill their disk until destroyed (Vast.ai)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from procure.clouds.base import Instance
from procure.fleet import actions, policy
from procure.fleet.context import FleetContext
from procure.store import fleet_repo

log = logging.getLogger(__name__)


LIVE = ("booting", "active", "unhealthy")


async def terminate_duplicates(ctx: FleetContext, listing: list[Instance]) -> list[str]:
    """Lambda's launch has no idempotency key: a launch whose answer was lost and that landed
    only after its retry leaves two instances named after one action. Keep the one the action
    recorded (else the first listed) and terminate the others, saying so; the ids terminated."""
    by_action: dict[str, list[Instance]] = {}
    for i in listing:
        if i.name and i.status in LIVE:
            by_action.setdefault(i.name, []).append(i)
    extras: dict[str, Instance] = {}  # id -> the duplicate
    with ctx.store.session() as s:
        for name, twins in by_action.items():
            action = fleet_repo.get_action(s, name) if len(twins) > 1 else None
            if action is None or action.action_type != policy.PROVISION:
                continue
            keep = next((i for i in twins if i.id == action.target_instance), twins[0])
            extras |= {i.id: i for i in twins if i.id != keep.id}
    if not extras or ctx.dry_run:
        return []
    # What the controller does to the cloud is an action like any other: audited, announced,
    # and no longer billed in the ledger. Recorded before the call, finished after it.
    now = ctx.clock()
    with ctx.store.session() as s:
        ids = [actions.record_cleanup(s, _duplicate(i), now) for i in extras.values()]
    await ctx.cloud.terminate(list(extras))  # idempotent; a failure is retried next scan
    log.warning("terminated duplicate launches %s (kept the one its action recorded)", extras)
    with ctx.store.session() as s:
        fleet_repo.end_instances(s, list(extras), now)
        for action_id in ids:
            actions.finish_cleanup(ctx, s, action_id, now)
    return list(extras)


def _duplicate(i: Instance) -> policy.Proposal:
    return policy.Proposal(
        policy.TERMINATE,
        i.id,
        f"Duplicate launch of {i.name}: a launch whose answer was lost landed twice (the "
        "instance its action recorded is kept)",
        i.instance_type,
        i.region,
        i.price_per_hour,
    )


LOST = ("preempted", "exited")  # stopped by the cloud (a dead host, an ended container)


async def terminate_lost(ctx: FleetContext, listing: list[Instance], now: datetime) -> list[str]:
    """The fleet's own launches the cloud has shown lost for a boot timeout (Vast.ai's host
    offline or unknown, its container exited: never to run again): the ledger ended them and the
    pool replaced them, but on the account they bill their disk until destroyed (and their GPU
    again should the host come back). Terminate them, saying so; the ids terminated. The boot
    timeout lets one that comes back at once be kept. One only stopped (`resumable`: paused for
    an unpaid balance, stopped by the operator, any RunPod pod EXITED) is not lost: its disk is
    the operator's, and stays."""
    lost = {i.id: i for i in listing if i.status in LOST and not i.resumable}
    if not lost or ctx.dry_run or not ctx.cloud.lost_bills_disk:
        return []
    since = now - timedelta(minutes=ctx.cfg.boot_timeout_mins)
    with ctx.store.session() as s:
        rows = [fleet_repo.get_instance(s, instance_id) for instance_id in lost]
        ours = [
            r.instance_id
            for r in rows
            if r is not None
            and r.launched_by
            and r.ended_at is not None
            and r.ended_at <= since
            # Terminated once already (a cloud may list it a while longer): not again.
            and fleet_repo.recent_same(s, policy.TERMINATE, r.instance_id, r.ended_at) is None
        ]
    if not ours:
        return []
    with ctx.store.session() as s:  # recorded before the call (`record_cleanup`)
        ids = [actions.record_cleanup(s, _lost(lost[i]), now) for i in ours]
    await ctx.cloud.terminate(ours)  # idempotent; a failure is retried (`carry_out`)
    log.warning("terminated fleet launches the cloud shows lost: %s", ours)
    with ctx.store.session() as s:
        for action_id in ids:
            actions.finish_cleanup(ctx, s, action_id, now)
    return ours


def _lost(i: Instance) -> policy.Proposal:
    return policy.Proposal(
        policy.TERMINATE,
        i.id,
        f"Launched and lost ({i.status} now, replaced): on the account it still bills its disk "
        "until destroyed",
        i.instance_type,
        i.region,
        0,  # the ledger ended it when it was lost: no running price is saved now
    )
