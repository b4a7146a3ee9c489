"""The store's interface to the agent's cloud instances and to what procure learned per
(provider, region, GPU): plain functions over a Session."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from procure.models import ACTIVE_JOB_STATUSES, RunStatus, utcnow
from procure.store.cloud_tables import CloudInstanceRow, CloudStatsRow, MetaRow
from procure.store.tables import JobRow, RunRow

LIVE = ("launching", "booting", "running", "terminating")


@dataclass(frozen=True)
class CloudInstance:
    name: str
    run_id: str
    job_id: str
    vendor_id: str
    provider: str
    offer: dict[str, Any]
    instance_id: str | None
    status: str
    node_url: str | None
    node_token: str
    node_job_id: str | None
    boot_deadline: datetime | None
    launched_at: datetime | None
    active_at: datetime | None
    ended_at: datetime | None
    reserved_until: datetime | None
    billed: int | None
    outcome: str | None
    end_reason: str | None
    fault: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class OfferStats:
    successes: int = 0
    failures: int = 0
    preemptions: int = 0
    gpu_hours: float = 0.0
    boots: int = 0
    boot_seconds: float = 0.0
    cooldown_until: datetime | None = None


def _record(row: CloudInstanceRow) -> CloudInstance:
    return CloudInstance(**{c.key: getattr(row, c.key) for c in row.__mapper__.column_attrs})


def insert_instance(s: Session, **values: Any) -> None:
    now = utcnow()
    s.add(CloudInstanceRow(created_at=now, updated_at=now, fault=0, **values))


def instance_of_job(s: Session, job_id: str) -> CloudInstance | None:
    row = s.scalar(select(CloudInstanceRow).where(CloudInstanceRow.job_id == job_id))
    return _record(row) if row is not None else None


def get_instance(s: Session, name: str) -> CloudInstance | None:
    row = s.get(CloudInstanceRow, name)
    return _record(row) if row is not None else None


def claim_late(s: Session, name: str, instance_id: str) -> bool:
    """Take instance `instance_id`, swept under the ended record `name`, for booking: one
    conditional UPDATE, so of two sweepers exactly one books it (the other waits, then sees the
    record already names it)."""
    result = s.execute(
        update(CloudInstanceRow)
        .where(
            CloudInstanceRow.name == name,
            (CloudInstanceRow.instance_id.is_(None))
            | (CloudInstanceRow.instance_id != instance_id),
        )
        .values(instance_id=instance_id, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def claim_more(s: Session, name: str, booked: int | None, billed: int) -> bool:
    """Move the record's bill from `booked` (as read before a sweep) to `billed`: one
    conditional UPDATE, so of two sweepers of an instance that billed on after its job ended,
    exactly one books the difference."""
    was = CloudInstanceRow.billed.is_(None) if booked is None else CloudInstanceRow.billed == booked
    result = s.execute(
        update(CloudInstanceRow)
        .where(CloudInstanceRow.name == name, was)
        .values(billed=billed, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def update_instance(s: Session, name: str, **values: Any) -> None:
    values["updated_at"] = utcnow()
    s.execute(update(CloudInstanceRow).where(CloudInstanceRow.name == name).values(**values))


def instances_of_run(s: Session, run_id: str) -> list[CloudInstance]:
    rows = s.scalars(
        select(CloudInstanceRow)
        .where(CloudInstanceRow.run_id == run_id)
        .order_by(CloudInstanceRow.created_at)
    )
    return [_record(r) for r in rows]


def install_tag(s: Session) -> str:
    """This store's install id (8 hex characters), made by migration 0011."""
    row = s.get(MetaRow, "install_id")
    if row is None:  # a store migrated by hand without it: made now, once
        row = MetaRow(key="install_id", value=secrets.token_hex(4))
        s.add(row)
        s.flush()
    return row.value


def live_owner(s: Session, name: str) -> bool:
    """Whether a live run owns the instance named `name`: its record is not terminated, its job
    is active and its run is running."""
    owner = s.execute(
        select(CloudInstanceRow.status, JobRow.status, RunRow.status)
        .join(JobRow, JobRow.id == CloudInstanceRow.job_id)
        .join(RunRow, RunRow.id == CloudInstanceRow.run_id)
        .where(CloudInstanceRow.name == name)
    ).first()
    if owner is None:
        return False
    status, job_status, run_status = owner
    return (
        status in LIVE
        and job_status in {str(j) for j in ACTIVE_JOB_STATUSES}
        and run_status == RunStatus.running
    )


def unowned_ending(s: Session, provider: str, limit: int = 100) -> list[CloudInstance]:
    """`provider`'s instances still `terminating` (a terminate accepted, the instance not
    confirmed gone) that no live run owns: their job was ended without that confirmation
    (`cloud_end.abandon`), or their run ended. The oldest first, `limit` at a time."""
    active = [str(j) for j in ACTIVE_JOB_STATUSES]
    rows = s.scalars(
        select(CloudInstanceRow)
        .join(JobRow, JobRow.id == CloudInstanceRow.job_id)
        .join(RunRow, RunRow.id == CloudInstanceRow.run_id)
        .where(
            CloudInstanceRow.status == "terminating",
            CloudInstanceRow.provider == provider,
            CloudInstanceRow.instance_id.is_not(None),
            JobRow.status.not_in(active) | (RunRow.status != RunStatus.running),
        )
        .order_by(CloudInstanceRow.updated_at)
        .limit(limit)
    )
    return [_record(r) for r in rows]


def offer_stats(s: Session, provider: str) -> dict[tuple[str, str], OfferStats]:
    """What was learned of `provider`, by (region, GPU)."""
    rows = s.scalars(select(CloudStatsRow).where(CloudStatsRow.provider == provider))
    return {
        (r.region, r.gpu): OfferStats(
            r.successes,
            r.failures,
            r.preemptions,
            r.gpu_hours,
            r.boots,
            r.boot_seconds,
            r.cooldown_until,
        )
        for r in rows
    }


def _stats_row(s: Session, provider: str, region: str, gpu: str) -> CloudStatsRow:
    key = (provider, region[:100], gpu[:32])
    row = s.get(CloudStatsRow, key)
    if row is not None:
        return row
    try:
        with s.begin_nested():  # two workers learning of one offer kind at once: one inserts
            row = CloudStatsRow(
                provider=key[0],
                region=key[1],
                gpu=key[2],
                successes=0,
                failures=0,
                preemptions=0,
                gpu_hours=0.0,
                boots=0,
                boot_seconds=0.0,
                updated_at=utcnow(),
            )
            s.add(row)
    except IntegrityError:
        row = s.get(CloudStatsRow, key)
        assert row is not None
    return row


def learn(
    s: Session,
    provider: str,
    region: str,
    gpu: str,
    *,
    success: bool | None = None,
    preempted: bool = False,
    gpu_hours: float = 0.0,
    boot_s: float | None = None,
    cooldown_until: datetime | None = None,
) -> None:
    """Count an outcome (a failure when `success` is False), a preemption, GPU-hours, a boot
    time, or cool the offer kind down until `cooldown_until`."""
    row = _stats_row(s, provider, region, gpu)
    if success is True:
        row.successes += 1
    elif success is False:
        row.failures += 1
    row.preemptions += int(preempted)
    row.gpu_hours += max(gpu_hours, 0.0)
    if boot_s is not None:
        row.boots += 1
        row.boot_seconds += max(boot_s, 0.0)
    if cooldown_until is not None and (
        row.cooldown_until is None or row.cooldown_until < cooldown_until
    ):
        row.cooldown_until = cooldown_until
    row.updated_at = utcnow()
    s.flush()
