"""Run leases: at most one ticker (worker or API call) holds a run at a time.

A lease is taken by one conditional UPDATE, atomic on SQLite and PostgreSQL alike; workers find
due runs with `FOR UPDATE SKIP LOCKED` on PostgreSQL so that they do not queue on each other.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from procure.models import RunStatus, utcnow
from procure.store.tables import RunRow


def _free(now: datetime):  # type: ignore[no-untyped-def]
    return or_(RunRow.lease_owner.is_(None), RunRow.lease_expires_at < now)


def acquire(s: Session, run_id: str, owner: str, ttl_s: float) -> bool:
    """Take the lease on one run if nobody holds it (or theirs expired)."""
    now = utcnow()
    result = s.execute(
        update(RunRow)
        .where(RunRow.id == run_id, _free(now))
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def acquire_due(s: Session, owner: str, ttl_s: float, limit: int) -> list[str]:
    """Lease up to `limit` running runs that are due for a tick; return their ids."""
    now = utcnow()
    query = (
        select(RunRow.id)
        .where(RunRow.status == RunStatus.running, RunRow.next_tick_at <= now, _free(now))
        .order_by(RunRow.next_tick_at)
        .limit(limit)
    )
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    ids = list(s.scalars(query))
    leased = []
    for run_id in ids:
        if acquire(s, run_id, owner, ttl_s):
            leased.append(run_id)
    return leased


def renew(s: Session, run_id: str, owner: str, ttl_s: float) -> bool:
    now = utcnow()
    result = s.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=ttl_s))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def release(s: Session, run_id: str, owner: str, next_tick_in_s: float | None = None) -> None:
    values: dict[str, object] = {"lease_owner": None, "lease_expires_at": None}
    if next_tick_in_s is not None:
        values["next_tick_at"] = utcnow() + timedelta(seconds=next_tick_in_s)
    s.execute(
        update(RunRow).where(RunRow.id == run_id, RunRow.lease_owner == owner).values(**values)
    )


def holder(s: Session, run_id: str) -> str | None:
    row = s.get(RunRow, run_id)
    if row is None or row.lease_owner is None:
        return None
    if row.lease_expires_at is not None and row.lease_expires_at < utcnow():
        return None
    return row.lease_owner
