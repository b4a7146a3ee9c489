"""The fleet's store interface: plain functions over a Session for actions, instances, samples,
the outbox and the controller lease."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from procure.bounds import clip
from procure.store import totals
from procure.store.fleet_tables import (
    ActionRow,
    FleetInstanceRow,
    FleetLeaseRow,
    FleetSampleRow,
    OutboxRow,
)
from procure.store.tables import StoreTotalRow

# Statuses an action goes through; `blocked`, `executed`, `failed`, `rejected` and
# `rolled_back` end it.
OPEN_STATUSES = ("pending", "approved", "executing")
RUNNING_STATUSES = ("booting", "active", "unhealthy")  # billed and counted against the caps
CLEAN_UP = "controller"  # `decided_by` of what the controller carried out on its own (actions)


# --- actions -------------------------------------------------------------------------------


# Every status an action enters, counted in the store's running totals (`fleet_actions:<type>:
# <status>`) in the writer's transaction: a counter that never goes back, whoever moves it.
COUNTED = "fleet_actions:"


def _entered(s: Session, action_type: str, status: str) -> None:
    s.add(StoreTotalRow(name=f"{COUNTED}{action_type}:{status}"[:64], value=1))


def actions_entered(s: Session) -> dict[tuple[str, str], int]:
    """How many times actions entered each (type, status), since counting began."""
    out: dict[tuple[str, str], int] = {}
    for name, n in totals.read(s).items():
        if name.startswith(COUNTED):
            action_type, _, status = name.removeprefix(COUNTED).rpartition(":")
            out[(action_type, status)] = n
    return out


def add_action(s: Session, **values: Any) -> ActionRow:
    row = ActionRow(**values)
    row.updated_at = values.get("created_at")
    s.add(row)
    _entered(s, row.action_type, row.status)
    s.flush()
    return row


def get_action(s: Session, action_id: str, *, lock: bool = False) -> ActionRow | None:
    query = select(ActionRow).where(ActionRow.action_id == action_id)
    if lock and s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return s.scalars(query).first()


def lock_action(s: Session, action_id: str) -> ActionRow | None:
    """The action, held until this transaction ends so that a check-then-insert on it runs
    alone: PostgreSQL locks its row; SQLite takes the write lock now (reads before a first
    write run outside the transaction there, so two callers would both pass the check)."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(text("UPDATE autonomous_actions SET status = status WHERE 0"))
    return get_action(s, action_id, lock=True)


def rollback_for(s: Session, action_id: str, action_type: str) -> ActionRow | None:
    """The action (of `action_type`) that rolls back `action_id` and has not ended in failure
    or a block, found however old (by the type index, not within a page of the newest ones)."""
    query = select(ActionRow).where(
        ActionRow.action_type == action_type,
        ActionRow.rollback_of == action_id,
        ActionRow.status.not_in(("failed", "blocked")),
    )
    return s.scalars(query.order_by(ActionRow.created_at, ActionRow.action_id).limit(1)).first()


def list_actions(
    s: Session, *, status: str | Iterable[str] | None = None, limit: int = 100
) -> list[ActionRow]:
    query = select(ActionRow).order_by(ActionRow.created_at.desc(), ActionRow.action_id)
    if isinstance(status, str):
        query = query.where(ActionRow.status == status)
    elif status is not None:
        query = query.where(ActionRow.status.in_(list(status)))
    return list(s.scalars(query.limit(limit)))


def expired_pending(s: Session, now: datetime, limit: int = 1000) -> list[ActionRow]:
    """Pending actions whose confirmation window ended by `now`, the longest expired first
    (however many newer ones are pending: a page of the newest never reached the old)."""
    query = (
        select(ActionRow)
        .where(
            ActionRow.status == "pending",
            ActionRow.expires_at.is_not(None),
            ActionRow.expires_at <= now,
        )
        .order_by(ActionRow.expires_at, ActionRow.action_id)
    )
    return list(s.scalars(query.limit(limit)))


def set_status(s: Session, row: ActionRow, status: str, now: datetime, **values: Any) -> None:
    if row.status != status:
        _entered(s, row.action_type, status)
    row.status = status
    row.updated_at = now
    for key, value in values.items():
        setattr(row, key, value)
    s.flush()


def transition(
    s: Session, action_id: str, from_status: str, to_status: str, now: datetime, **values: Any
) -> ActionRow | None:
    """Compare-and-set: move the action from `from_status` to `to_status` only if it is still
    there, in one conditional UPDATE (no read-then-write race on SQLite or PostgreSQL). The
    row as it now is when this call won, None when another writer moved it first."""
    result = s.execute(
        update(ActionRow)
        .where(ActionRow.action_id == action_id, ActionRow.status == from_status)
        .values(status=to_status, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = s.scalars(
        select(ActionRow)
        .where(ActionRow.action_id == action_id)
        .execution_options(populate_existing=True)
    ).first()
    if row is not None and from_status != to_status:
        _entered(s, row.action_type, to_status)
    return row


def count_status(s: Session, status: str) -> int:
    """How many actions have this status (the true count, not one page's length)."""
    query = select(func.count()).select_from(ActionRow).where(ActionRow.status == status)
    return int(s.scalar(query) or 0)


def last_acted(s: Session, action_type: str) -> datetime | None:
    """When an action of this type last went to the cloud (or would have, in a dry run); one
    still in flight (being sent, or waiting to be sent again) counts as acting now. The
    controller's own clean-ups (`actions.record_cleanup`: a duplicate launch, a launch the cloud
    lost) are no decision the cooldown paces: counted, they held the policy's next termination
    of an instance still billing for the whole cooldown."""
    executed = s.scalar(
        select(func.max(ActionRow.executed_at)).where(
            ActionRow.action_type == action_type,
            ActionRow.executed_at.is_not(None),
            ActionRow.decided_by.is_distinct_from(CLEAN_UP),
        )
    )
    flying = s.scalar(
        select(func.max(ActionRow.updated_at)).where(
            ActionRow.action_type == action_type,
            ActionRow.status == "executing",
            ActionRow.decided_by.is_distinct_from(CLEAN_UP),
        )
    )
    return max((t for t in (executed, flying) if t is not None), default=None)


def open_cleanup(s: Session, target: str) -> ActionRow | None:
    """The controller's own termination of `target` still in flight (`executing`), if any."""
    query = select(ActionRow).where(
        ActionRow.action_type == "terminate_instance",
        ActionRow.target_instance == target,
        ActionRow.status == "executing",
        ActionRow.decided_by == CLEAN_UP,
    )
    return s.scalars(query.order_by(ActionRow.created_at).limit(1)).first()


def recent_same(
    s: Session, action_type: str, target: str | None, since: datetime
) -> ActionRow | None:
    """The latest action of this type on this target created since `since`."""
    query = select(ActionRow).where(
        ActionRow.action_type == action_type,
        ActionRow.created_at >= since,
        ActionRow.target_instance.is_(None)
        if target is None
        else ActionRow.target_instance == target,
    )
    return s.scalars(query.order_by(ActionRow.created_at.desc()).limit(1)).first()


@dataclass(frozen=True)
class ActionCounts:
    by_type: dict[str, int]
    by_status: dict[str, int]
    by_type_status: dict[tuple[str, str], int]
    blocks_by_reason: dict[str, int]
    confirmations_required: int
    cost_by_type: dict[str, float]  # executed actions' cost impact, $/h


def count_actions(s: Session) -> ActionCounts:
    rows = s.execute(
        select(
            ActionRow.action_type,
            ActionRow.status,
            ActionRow.block_reason,
            func.count(),
            func.sum(ActionRow.cost_impact),
        ).group_by(ActionRow.action_type, ActionRow.status, ActionRow.block_reason)
    ).all()
    by_type: dict[str, int] = {}
    by_status: dict[str, int] = {}
    by_type_status: dict[tuple[str, str], int] = {}
    blocks: dict[str, int] = {}
    cost: dict[str, float] = {}
    for action_type, status, block_reason, n, impact in rows:
        by_type[action_type] = by_type.get(action_type, 0) + n
        by_status[status] = by_status.get(status, 0) + n
        key = (action_type, status)
        by_type_status[key] = by_type_status.get(key, 0) + n
        if status == "blocked" and block_reason:
            blocks[block_reason] = blocks.get(block_reason, 0) + n
        if status in ("executed", "rolled_back"):
            cost[action_type] = cost.get(action_type, 0.0) + float(impact or Decimal(0))
    confirmations = s.scalar(
        select(func.count()).select_from(ActionRow).where(ActionRow.needed_approval.is_(True))
    )
    return ActionCounts(by_type, by_status, by_type_status, blocks, int(confirmations or 0), cost)


# --- instances (instance-hours) ------------------------------------------------------------


def live_instances(s: Session) -> list[FleetInstanceRow]:
    return list(
        s.scalars(
            select(FleetInstanceRow)
            .where(FleetInstanceRow.ended_at.is_(None))
            .order_by(FleetInstanceRow.first_seen_at, FleetInstanceRow.instance_id)
        )
    )


def get_instance(s: Session, instance_id: str) -> FleetInstanceRow | None:
    return s.get(FleetInstanceRow, instance_id)


def instance_named(s: Session, name: str) -> FleetInstanceRow | None:
    return s.scalars(select(FleetInstanceRow).where(FleetInstanceRow.name == name)).first()


def _fitted(values: dict[str, Any]) -> dict[str, Any]:
    """Texts from a cloud's listing cut to their columns (a Vast.ai label may have 1,024
    characters, the name column 255: one such instance on the account failed every scan)."""
    columns = FleetInstanceRow.__table__.c
    out = {}
    for key, value in values.items():
        length = getattr(columns[key].type, "length", None) if key in columns else None
        out[key] = value[:length] if isinstance(value, str) and length else value
    return out


def upsert_instance(s: Session, now: datetime, **values: Any) -> FleetInstanceRow:
    """Record that the cloud shows this instance now (billing runs while it is not ended)."""
    values = _fitted(values)
    row = s.get(FleetInstanceRow, values["instance_id"])
    paused_since = None
    if row is None:
        row = FleetInstanceRow(first_seen_at=now, last_seen_at=now, **values)
        s.add(row)
    else:
        # Listed stopped (paused, kept as resumable), not missing (`end_instances`: it may have
        # run all along): should it run again, the hours it stood stopped billed no GPU.
        if row.status not in (*RUNNING_STATUSES, "terminated"):
            paused_since = row.ended_at
        for key, value in values.items():
            if value is not None or key != "launched_by":
                setattr(row, key, value)
        row.last_seen_at = now
    if row.status not in RUNNING_STATUSES and row.ended_at is None:
        row.ended_at = now
    elif row.status in RUNNING_STATUSES:
        if paused_since is not None and now > paused_since:
            # Billed from first seen to now while it runs (`ledger.fleet_spent`): moved on by
            # the pause, it counts the hours it ran, not those it stood stopped.
            row.first_seen_at += now - paused_since
        row.ended_at = None
    s.flush()
    return row


def end_instances(s: Session, instance_ids: Iterable[str], now: datetime) -> None:
    ids = list(instance_ids)
    if ids:
        s.execute(
            update(FleetInstanceRow)
            .where(FleetInstanceRow.instance_id.in_(ids), FleetInstanceRow.ended_at.is_(None))
            .values(ended_at=now, status="terminated")
            .execution_options(synchronize_session=False)
        )


# --- samples -------------------------------------------------------------------------------


def add_samples(s: Session, samples: list[dict[str, Any]]) -> None:
    if samples:
        s.add_all(FleetSampleRow(**sample) for sample in samples)
        s.flush()


def samples_since(s: Session, instance_ids: list[str], since: datetime) -> list[FleetSampleRow]:
    if not instance_ids:
        return []
    return list(
        s.scalars(
            select(FleetSampleRow)
            .where(FleetSampleRow.instance_id.in_(instance_ids), FleetSampleRow.taken_at >= since)
            .order_by(FleetSampleRow.instance_id, FleetSampleRow.taken_at)
        )
    )


def prune_samples(s: Session, before: datetime) -> int:
    result = s.execute(delete(FleetSampleRow).where(FleetSampleRow.taken_at < before))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


# --- outbox --------------------------------------------------------------------------------


def enqueue(s: Session, channel: str, payload: dict[str, Any], now: datetime) -> None:
    s.add(OutboxRow(channel=channel, payload=payload, created_at=now, next_attempt_at=now))
    s.flush()


def due_messages(s: Session, channel: str, now: datetime, limit: int = 20) -> list[OutboxRow]:
    """The oldest undelivered messages, in order, up to the first that is not due yet: a
    message waiting out a Retry-After holds back the ones behind it (order is kept)."""
    queued = s.scalars(
        select(OutboxRow)
        .where(OutboxRow.channel == channel, OutboxRow.delivered_at.is_(None))
        .order_by(OutboxRow.id)
        .limit(limit)
    )
    due = []
    for message in queued:
        if message.next_attempt_at > now:
            break
        due.append(message)
    return due


def claim_message(s: Session, message_id: int, now: datetime, until: datetime) -> bool:
    """Take a due message for delivery until `until` (one conditional UPDATE): of two
    deliverers exactly one gets it; a deliverer that dies with it leaves it due again then."""
    result = s.execute(
        update(OutboxRow)
        .where(
            OutboxRow.id == message_id,
            OutboxRow.delivered_at.is_(None),
            OutboxRow.next_attempt_at <= now,
        )
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def mark_delivered(s: Session, message_id: int, now: datetime) -> None:
    s.execute(
        update(OutboxRow)
        .where(OutboxRow.id == message_id)
        .values(delivered_at=now, attempts=OutboxRow.attempts + 1, last_error=None)
        .execution_options(synchronize_session=False)
    )


def mark_retry(
    s: Session, message_id: int, at: datetime, error: str, *, restart: bool = False
) -> None:
    """Due again at `at` after `error`; `restart`: a failure of another kind than the last
    one, so the count (of failures of one kind in a row) starts again."""
    attempts = 1 if restart else OutboxRow.attempts + 1
    s.execute(
        update(OutboxRow)
        .where(OutboxRow.id == message_id)
        .values(next_attempt_at=at, attempts=attempts, last_error=clip(error, 300))
        .execution_options(synchronize_session=False)
    )


def prune_outbox(s: Session, before: datetime) -> None:
    s.execute(
        delete(OutboxRow).where(
            OutboxRow.delivered_at.is_not(None), OutboxRow.delivered_at < before
        )
    )


def outbox_counts(s: Session) -> dict[str, int]:
    rows = s.execute(
        select(OutboxRow.channel, OutboxRow.delivered_at.is_(None), func.count()).group_by(
            OutboxRow.channel, OutboxRow.delivered_at.is_(None)
        )
    ).all()
    return {f"{channel}_{'queued' if queued else 'delivered'}": n for channel, queued, n in rows}


# --- the controller lease ------------------------------------------------------------------


def take_lease(
    s: Session, name: str, owner: str, ttl_s: float, now: datetime, *, dry_run: bool = False
) -> bool:
    """Take or renew the fleet's lease (one conditional UPDATE, or the first INSERT). A live
    controller (`dry_run` False) also takes it from a dry run that holds it: a rehearsal never
    keeps the fleet from being run; the dry run's next renewal fails and it stands by. A dry run
    takes it only free, lapsed or its own."""
    expires = now + timedelta(seconds=ttl_s)
    free = (
        (FleetLeaseRow.owner == owner)
        | FleetLeaseRow.owner.is_(None)
        | (FleetLeaseRow.expires_at < now)
    )
    if not dry_run:
        free = free | FleetLeaseRow.dry_run.is_(True)
    result = s.execute(
        update(FleetLeaseRow)
        .where(FleetLeaseRow.name == name, free)
        .values(owner=owner, expires_at=expires, dry_run=dry_run)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    if s.get(FleetLeaseRow, name) is not None:
        return False
    try:
        with s.begin_nested():
            s.add(FleetLeaseRow(name=name, owner=owner, expires_at=expires, dry_run=dry_run))
    except IntegrityError:  # another controller inserted it first
        return False
    return True


def keep_lease(s: Session, name: str, owner: str, ttl_s: float, now: datetime) -> bool:
    """Renew the fleet's lease only while `owner` still holds it: once it has lapsed, another
    controller may have taken it (and let it go) meanwhile, and what was decided under it is
    stale. Unlike `take_lease`, a lapsed or free lease is not taken again."""
    result = s.execute(
        update(FleetLeaseRow)
        .where(
            FleetLeaseRow.name == name,
            FleetLeaseRow.owner == owner,
            FleetLeaseRow.expires_at >= now,
        )
        .values(expires_at=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def other_leases_held(s: Session, name: str, now: datetime) -> list[FleetLeaseRow]:
    """The leases other than `name` held at `now` (on the wall clock, as taken): the other
    fleets whose controllers run on this store."""
    query = select(FleetLeaseRow).where(
        FleetLeaseRow.name != name,
        FleetLeaseRow.owner.is_not(None),
        FleetLeaseRow.expires_at >= now,
    )
    return list(s.scalars(query.order_by(FleetLeaseRow.name)))


def release_lease(s: Session, name: str, owner: str) -> None:
    s.execute(
        update(FleetLeaseRow)
        .where(FleetLeaseRow.name == name, FleetLeaseRow.owner == owner)
        .values(owner=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )


def lease_row(s: Session, name: str) -> FleetLeaseRow | None:
    return s.get(FleetLeaseRow, name)


def note_scan(
    s: Session,
    name: str,
    owner: str,
    now: datetime,
    error: str | None,
    backoff_until: datetime | None,
    *,
    wall: datetime | None = None,
) -> None:
    """The scan's outcome; `now` is on the controller's clock, `wall` the wall clock then.
    Noted only while `owner` holds the lease (or held it last): a scan whose lease another
    controller took meanwhile (a live one from a dry run) would put its error, its older scan
    and its backoff on the fleet's record, under the other's name (`fleet status`)."""
    offset = None if wall is None else (now - wall).total_seconds()
    s.execute(
        update(FleetLeaseRow)
        .where(FleetLeaseRow.name == name, FleetLeaseRow.owner == owner)
        .values(
            last_scan_at=now,
            clock_offset_s=offset,
            last_error=clip(error, 500) if error else None,
            backoff_until=backoff_until,
        )
        .execution_options(synchronize_session=False)
    )
