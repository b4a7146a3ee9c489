"""The fleet's own launches that the cloud stopped but keeps, announced: a RunPod pod EXITED, a
Vast.ai instance paused or stopped (`Instance.resumable`). The controller never destroys one (its
disk may be the operator's work: `cleanups.terminate_lost`), but on the account it still bills its
disk, so the operator is told once, in the audit trail and on Slack, with how to end it. Not
every scan: an announcement is looked up in the outbox's audit entries, and made again only
after REMIND_AFTER (a reminder while it still bills)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from procure.clouds.base import Instance
from procure.fleet.context import FleetContext
from procure.fleet.notify import slack_escape
from procure.store import fleet_repo
from procure.store.fleet_tables import OutboxRow

log = logging.getLogger(__name__)
# Delivered outbox messages are pruned after 7 days: an entry older than that may be gone, so
# the reminder comes then, whatever the pruning does.
REMIND_AFTER = timedelta(days=7)
DEFAULT_HOW = "resume it, or terminate it in the provider's console to stop the disk's billing"


def how_to_end(cloud: Any, instance_id: str) -> str:
    """What the operator can do, as the cloud's client says (`end_kept`, with `{id}`)."""
    template = getattr(cloud, "end_kept", None)
    if not isinstance(template, str) or "{id}" not in template:
        return DEFAULT_HOW
    return template.replace("{id}", instance_id)


def _announced(s: Session, ids: list[str], since: datetime) -> set[str]:
    """The instances among `ids` whose keeping the audit trail announced since `since`."""
    instance = OutboxRow.payload["kept"]["instance"].as_string()
    rows = s.execute(
        select(instance).where(
            OutboxRow.channel == "audit", OutboxRow.created_at >= since, instance.in_(ids)
        )
    )
    return {str(found) for (found,) in rows}


def announce_kept(ctx: FleetContext, listing: list[Instance], now: datetime) -> list[str]:
    """Announce the fleet's launches the cloud lists stopped with their disk kept (where a
    cloud's kept instances bill their disk: `Cloud.lost_bills_disk`), each once per
    REMIND_AFTER; the ids announced now."""
    kept = {i.id: i for i in listing if i.resumable}
    # A cloud that does not say whether it keeps a stopped instance's disk billing: told all
    # the same (a word too many costs less than a disk billed unseen).
    if not kept or not getattr(ctx.cloud, "lost_bills_disk", True):
        return []
    announced: list[str] = []
    with ctx.store.session() as s:
        ours = [
            instance_id
            for instance_id in kept
            if (row := fleet_repo.get_instance(s, instance_id)) is not None and row.launched_by
        ]
        if not ours:
            return []
        already = _announced(s, ours, now - REMIND_AFTER)
        for instance_id in ours:
            if instance_id in already:
                continue
            _announce(ctx, s, kept[instance_id], now)
            announced.append(instance_id)
    if announced:
        log.warning("fleet launches stopped by the cloud, kept with their disk: %s", announced)
    return announced


def _announce(ctx: FleetContext, s: Session, i: Instance, now: datetime) -> None:
    how = how_to_end(ctx.cloud, i.id)
    label = f"{i.name} ({i.id})" if i.name else i.id
    text = (
        f"Kept: fleet instance {label} was stopped by the cloud ({i.status}); it is kept, not "
        f"destroyed (its disk may hold work), and it still bills its disk on the account. To "
        f"end it: {how}."
    )
    entry = {
        "instance": i.id,
        "name": i.name,
        "status": i.status,
        "instance_type": i.instance_type,
        "region": i.region,
        "reason": "stopped by the cloud, kept with its disk (still billed)",
        "to_end": how,
    }
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    fleet_repo.enqueue(s, "audit", {"timestamp": stamp, "kept": entry}, now)
    if ctx.slack:
        fleet_repo.enqueue(s, "slack", {"text": slack_escape(f"💾 {text}")}, now)
