"""Recording and carrying out actions, exactly once: a launch is named after its action id and
the action is `executing` (durable) before the cloud is called, so a controller killed between
the cloud's answer and its record finds the instance by name instead of launching another;
terminations are idempotent. Also approval, rejection, expiry and rollback."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from procure.bounds import clip
from procure.clouds.base import CloudError, Instance, ProviderError
from procure.crashpoints import crash_point
from procure.fleet import notify, rails
from procure.fleet.context import FleetContext
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.models import utcnow
from procure.store import Store, fleet_repo
from procure.store.fleet_tables import ActionRow

log = logging.getLogger(__name__)
# A cloud call ends within this share of the fleet's lease, which is renewed just before it.
LEASE_SHARE = 0.8


class ActionRefused(Exception):
    """The action is not in a state that allows this (e.g. approving an executed one)."""


def new_action_id(action_type: str, now: datetime) -> str:
    return f"{action_type.split('_')[0]}_{int(now.timestamp())}_{uuid.uuid4().hex[:8]}"


def proposal_of(row: ActionRow) -> Proposal:
    return Proposal(
        row.action_type,
        row.target_instance,
        row.reason,
        row.instance_type or "",
        row.region or "",
        row.price_per_hour,
        row.metrics_before or {},
    )


def _add(s: Session, p: Proposal, now: datetime, **fields: Any) -> ActionRow:
    """The action row of proposal `p`, with what its path adds (status, decision, ...)."""
    return fleet_repo.add_action(
        s,
        action_id=new_action_id(p.action_type, now),
        action_type=p.action_type,
        target_instance=p.target,
        reason=clip(p.reason, 1000),
        cost_impact=Decimal(str(p.cost_impact)),
        metrics_before=p.metrics_before,
        created_at=now,
        instance_type=p.instance_type,
        region=p.region,
        price_per_hour=p.price_per_hour,
        **fields,
    )


def record(ctx: FleetContext, p: Proposal) -> tuple[str, str]:
    """Pass the proposal through the rails and record it: (action id, status)."""
    now = ctx.clock()
    with ctx.store.session() as s:
        verdict = rails.check(s, p, ctx.cfg, ctx.caps, now, dry_run=ctx.dry_run)
        status = {"go": "approved", "blocked": "blocked", "pending": "pending"}[verdict.outcome]
        row = _add(
            s,
            p,
            now,
            status=status,
            dry_run=ctx.dry_run,
            block_reason=verdict.reason,
            error_message=verdict.detail or None,
            needed_approval=verdict.outcome == "pending",
            expires_at=now + timedelta(minutes=ctx.cfg.confirmation_timeout_mins)
            if verdict.outcome == "pending"
            else None,
        )
        if status != "approved":
            notify.announce(s, row, now, slack=ctx.slack, detail=verdict.detail)
        return row.action_id, status


def record_cleanup(s: Session, p: Proposal, now: datetime) -> str:
    """Record a termination the controller makes on its own (a duplicate launch, a launch the
    cloud lost) before the cloud is called: `executing`, as any action in flight, so that a
    controller killed after the cloud's answer finishes it on restart (`carry_out`) and the
    audit trail never misses it. One already in flight for the target is taken up, not doubled.
    Its action id."""
    assert p.action_type == TERMINATE and p.target is not None
    found = fleet_repo.open_cleanup(s, p.target)
    if found is not None:
        return found.action_id
    row = _add(
        s,
        p,
        now,
        status="executing",
        attempts=1,
        dry_run=False,
        decided_by=fleet_repo.CLEAN_UP,  # not paced by the cooldown (`last_acted`)
        decided_at=now,
    )
    return row.action_id


def finish_cleanup(ctx: FleetContext, s: Session, action_id: str, now: datetime) -> None:
    """The cloud terminated it: executed, announced like any executed action (once: a restart
    that finished it already leaves it)."""
    row = fleet_repo.get_action(s, action_id, lock=True)
    if row is None or row.status != "executing":
        return
    fleet_repo.set_status(
        s,
        row,
        "executed",
        now,
        executed_at=now,
        metrics_after={"terminated": [row.target_instance]},
        error_message=None,
    )
    notify.announce(s, row, now, slack=ctx.slack)


def _fail(ctx: FleetContext, s: Session, row: ActionRow, error: str, now: datetime) -> None:
    fleet_repo.set_status(s, row, "failed", now, error_message=clip(error, 1000))
    notify.announce(s, row, now, slack=ctx.slack)


def _finish_launch(
    ctx: FleetContext, s: Session, row: ActionRow, ids: list[str], found: list[Instance]
) -> None:
    now = ctx.clock()
    by_id = {i.id: i for i in found}
    for instance_id in ids:
        known = by_id.get(instance_id)
        fleet_repo.upsert_instance(
            s,
            now,
            instance_id=instance_id,
            name=row.action_id,
            instance_type=row.instance_type or "",
            region=row.region or "",
            ip=known.ip if known else None,
            status=known.status if known else "booting",
            # A listed price of 0 is none (RunPod's EXITED pod): the price the launch was for.
            price_per_hour=known.price_per_hour
            if known and known.price_per_hour
            else row.price_per_hour,
            gpus=known.gpus if known else 1,
            launched_by=row.action_id,
        )
    fleet_repo.set_status(
        s,
        row,
        "executed",
        now,
        executed_at=now,
        target_instance=ids[0] if ids else None,
        rollback_data={"terminate_instance_ids": ids},
        metrics_after={"instance_ids": ids},
        error_message=None,
    )
    notify.announce(s, row, now, slack=ctx.slack)


async def carry_out(
    ctx: FleetContext, action_id: str, listing: list[Instance] | None, *, held: bool = False
) -> str:
    """Carry out one approved (or interrupted) action; its status afterwards. `listing`: the
    cloud's instances as just listed, where an interrupted launch is looked for by name. `held`:
    the caller (a scan) took the fleet's lease before deciding, and acts only while it still
    holds it; else the lease is taken here."""
    now = ctx.clock()
    with ctx.store.session() as s:
        row = fleet_repo.get_action(s, action_id, lock=True)
        if row is None or row.status not in ("approved", "executing"):
            return row.status if row else "missing"
        if row.next_attempt_at is not None and row.next_attempt_at > now:
            return row.status  # backing off after a retryable cloud error
        if ctx.dry_run:
            # A live controller's action (in flight, or approved by a person: a dry run's own
            # are blocked when recorded): a dry run sends nothing, and leaves it to the live one.
            return row.status
        retry = row.status == "executing" and row.action_type == PROVISION
        if retry and listing is not None:
            mine = [i for i in listing if i.name == action_id]
            if mine:  # launched before a crash (or a lost answer): record it, launch nothing
                log.info("action %s: found its instance %s by name", action_id, mine[0].id)
                _finish_launch(ctx, s, row, [i.id for i in mine], mine)
                return "executed"
            if row.attempts >= ctx.cfg.max_launch_attempts:  # its last answer was lost
                error = f"{row.error_message or 'no answer'}; no instance by its name appeared"
                _fail(ctx, s, row, error, now)
                return "failed"
        if row.status == "approved" or retry:  # a launch sent again passes the caps again
            verdict = rails.check(
                s,
                proposal_of(row),
                ctx.cfg,
                ctx.caps,
                now,
                dry_run=ctx.dry_run,
                approved=True,
                action_id=action_id,
            )
            if verdict.outcome == "blocked":
                fleet_repo.set_status(
                    s,
                    row,
                    "blocked",
                    now,
                    block_reason=verdict.reason,
                    error_message=verdict.detail,
                )
                notify.announce(s, row, now, slack=ctx.slack, detail=verdict.detail)
                return "blocked"
        # The call below must end while this controller still holds the fleet: another one
        # taking over would see the action in flight, not yet listed, and send it again.
        lease = fleet_repo.keep_lease if held else fleet_repo.take_lease
        if not lease(s, ctx.lease_name, ctx.owner, ctx.cfg.lease_s, utcnow()):
            return row.status  # another controller has had the fleet since: it carries this out
        fleet_repo.set_status(s, row, "executing", now, attempts=row.attempts + 1)
        attempts, p = row.attempts, proposal_of(row)
    crash_point("fleet_intent")
    try:
        async with asyncio.timeout(ctx.cfg.lease_s * LEASE_SHARE):
            if p.action_type == PROVISION:
                ids = await ctx.cloud.launch(
                    instance_type=p.instance_type,
                    region=p.region,
                    name=action_id,
                    ssh_key_names=ctx.cfg.ssh_key_names,
                    max_price_per_hour=p.price_per_hour or None,
                )
                crash_point("fleet_launched")
                gone: list[Instance] = []
            else:
                gone = await ctx.cloud.terminate([p.target] if p.target else [])
                ids = [p.target] if p.target else []
                crash_point("fleet_terminated")
    except CloudError as exc:
        return _cloud_error(ctx, action_id, exc, attempts)
    except TimeoutError:  # it may have landed: looked for by name, like any lost answer
        lost = ProviderError(f"no answer within {ctx.cfg.lease_s * LEASE_SHARE:g}s")
        return _cloud_error(ctx, action_id, lost, attempts)
    except asyncio.CancelledError:
        # Cut in flight (the scan's time limit, FLEET_SCAN_TIMEOUT_S, or a shutdown), which
        # lets the fleet's lease go: an answer lost all the same, backed off before it is sent
        # again, or a controller taking over at once would launch while the cloud still makes
        # this one. The store's trouble here must not hide the cancellation.
        try:
            lost = ProviderError("no answer: cut in flight (the scan's time limit, or a stop)")
            _cloud_error(ctx, action_id, lost, attempts)
        except Exception as exc:
            log.warning("action %s: cut in flight, not recorded: %s", action_id, exc)
        raise
    now = ctx.clock()
    with ctx.store.session() as s:
        row = fleet_repo.get_action(s, action_id, lock=True)
        assert row is not None
        if p.action_type == PROVISION:
            _finish_launch(ctx, s, row, ids, [])
        else:
            fleet_repo.end_instances(s, ids, now)
            fleet_repo.set_status(
                s,
                row,
                "executed",
                now,
                executed_at=now,
                metrics_after={"terminated": [i.id for i in gone] or ids},
                error_message=None,
            )
            notify.announce(s, row, now, slack=ctx.slack)
            if row.rollback_of:
                original = fleet_repo.get_action(s, row.rollback_of)
                if original is not None:
                    fleet_repo.set_status(s, original, "rolled_back", now)
                    notify.announce(s, original, now, slack=ctx.slack)
    return "executed"


def _cloud_error(ctx: FleetContext, action_id: str, exc: CloudError, attempts: int) -> str:
    """A retryable error leaves the action `executing`, to be looked for by name and retried
    after a back-off; any other (capacity, quota, bad key) fails it. A launch's last retryable
    error may still have launched it: it is looked for by name once more before it fails."""
    now = ctx.clock()
    error = clip(f"{type(exc).__name__}: {exc}", 500)
    with ctx.store.session() as s:
        row = fleet_repo.get_action(s, action_id, lock=True)
        assert row is not None
        last = attempts >= ctx.cfg.max_launch_attempts
        if exc.retryable and (not last or row.action_type == PROVISION):
            wait = timedelta(seconds=min(3600.0, ctx.cfg.scan_interval_s * 2**attempts))
            fleet_repo.set_status(
                s, row, "executing", now, next_attempt_at=now + wait, error_message=error
            )
            log.warning("action %s: %s; retrying in %s", action_id, error, wait)
            return "executing"
        _fail(ctx, s, row, error, now)
    log.error("action %s failed: %s", action_id, error)
    return "failed"


# --- people's decisions ----------------------------------------------------------------------


def _timeout_note(row: ActionRow) -> str:
    """Why an expired action ended: the seed's wording, with the time it had to be confirmed."""
    if row.expires_at is None or row.created_at is None:
        return "no confirmation in time"
    minutes = (row.expires_at - row.created_at).total_seconds() / 60
    return f"no confirmation within {minutes:g} min"


def expire(ctx: FleetContext) -> int:
    """Pending actions past their confirmation timeout are rejected (as expired). Each is a
    compare-and-set, so an approval that won the race is never overwritten."""
    now = ctx.clock()
    n = 0
    with ctx.store.session() as s:
        for row in fleet_repo.expired_pending(s, now):
            done = fleet_repo.transition(
                s,
                row.action_id,
                "pending",
                "rejected",
                now,
                decided_by="timeout",
                decided_at=now,
                error_message=_timeout_note(row),
            )
            if done is not None:
                notify.announce(s, done, now, slack=ctx.slack)
                n += 1
    return n


# A controller whose last scan is this recent runs on the wall clock; one further off runs on
# its own (a simulation, a test's manual clock), and expiry is judged on that one.
_CLOCK_SKEW = timedelta(hours=1)


def judged_at(s: Session, fleet_name: str, now: datetime) -> datetime:
    """When, for expiry, it is now: on the controller's clock, the wall clock moved by the
    offset its last scan recorded (a stopped controller's old scan is not a clock far behind:
    an approval hours late is refused). A store from before offsets were recorded: the wall
    clock, unless the last scan says the controller's clock is clearly another."""
    lease = fleet_repo.lease_row(s, f"fleet:{fleet_name}")
    last = lease.last_scan_at if lease is not None else None
    if last is None:
        return now
    if lease is not None and lease.clock_offset_s is not None:
        return now + timedelta(seconds=lease.clock_offset_s)
    if last > now or now - last > _CLOCK_SKEW:
        return last
    return now


def decide(
    store: Store,
    action_id: str,
    approve: bool,
    by: str,
    now: datetime,
    *,
    slack: bool = False,
    fleet_name: str = "default",
) -> ActionRow:
    """Approve or reject a pending action (the controller carries out an approved one). One
    compare-and-set from `pending`: of concurrent approve and reject exactly one wins, and the
    other is refused. A pending action past its deadline is not approvable: it ends expired."""
    expired = False
    with store.session() as s:
        row = fleet_repo.get_action(s, action_id)
        if row is None:
            raise KeyError(action_id)
        if row.status != "pending":
            raise ActionRefused(f"action {action_id} is {row.status}, not pending")
        expires_at = row.expires_at
        if expires_at is not None and expires_at <= judged_at(s, fleet_name, now):
            done = fleet_repo.transition(
                s,
                action_id,
                "pending",
                "rejected",
                now,
                decided_by="timeout",
                decided_at=now,
                error_message=_timeout_note(row),
            )
            if done is not None:
                notify.announce(s, done, now, slack=slack)
            expired = True
        elif approve:
            done = fleet_repo.transition(
                s, action_id, "pending", "approved", now, decided_by=by, decided_at=now
            )
        else:
            done = fleet_repo.transition(
                s,
                action_id,
                "pending",
                "rejected",
                now,
                decided_by=by,
                decided_at=now,
                error_message=f"rejected by {by}",
            )
            if done is not None:
                notify.announce(s, done, now, slack=slack)
        if done is None:  # another decision (or the controller's expiry) came first
            s.expire_all()
            current = fleet_repo.get_action(s, action_id)
            status = current.status if current is not None else "gone"
            raise ActionRefused(f"action {action_id} is {status}, not pending")
    if expired:  # committed above: it stays expired
        raise ActionRefused(f"action {action_id} expired: its confirmation time is over")
    return done


def rollback(store: Store, action_id: str, by: str, now: datetime) -> ActionRow:
    """Roll back an executed provision: an approved termination of what it launched (the
    controller carries it out). A termination cannot be rolled back, by design."""
    with store.session() as s:
        # Held from the check for an earlier rollback to the insert: two callers add one.
        row = fleet_repo.lock_action(s, action_id)
        if row is None:
            raise KeyError(action_id)
        if row.action_type == TERMINATE:
            raise ActionRefused(
                "a termination cannot be rolled back (by design: the instance and its disk are "
                "gone); provision a new instance instead"
            )
        if row.status != "executed" or row.dry_run:
            raise ActionRefused(f"action {action_id} is {row.status}: nothing to roll back")
        ids = (row.rollback_data or {}).get("terminate_instance_ids") or []
        if not ids:
            raise ActionRefused(f"action {action_id} launched nothing to roll back")
        earlier = fleet_repo.rollback_for(s, action_id, TERMINATE)
        if earlier is not None:
            return earlier  # already asked: asking twice is fine
        instance = fleet_repo.get_instance(s, ids[0])
        return fleet_repo.add_action(
            s,
            action_id=new_action_id(TERMINATE, now),
            action_type=TERMINATE,
            target_instance=ids[0],
            reason=f"Rollback of {action_id} requested by {by}",
            cost_impact=-(row.cost_impact or Decimal(0)),
            status="approved",
            created_at=now,
            dry_run=False,
            instance_type=row.instance_type,
            region=row.region,
            price_per_hour=instance.price_per_hour if instance else row.price_per_hour,
            decided_by=by,
            decided_at=now,
            rollback_of=action_id,
        )
