"""Run leases: at most one ticker (worker or API call) holds a run at a time (invariant 4).

A lease is `runs.lease_owner` + `runs.lease_expires_at`, taken by one conditional UPDATE, atomic
on SQLite and PostgreSQL alike. Workers lease a batch of due runs in one statement
(`UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING id` on PostgreSQL, so
that workers never queue on each other's rows), renew all their leases with one heartbeat
UPDATE, and release them in batches together with the tick log: one `tick_log` row per tick,
whose [started_at, finished_at] lies inside the lease, so the intervals of one run never overlap.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from procure.models import RunStatus, utcnow
from procure.store.tables import RunRow, TickLogRow

OUTCOME_MAX = 100  # tick_log.outcome's width


@dataclass(frozen=True)
class TickRecord:
    """One tick, as the tick log keeps it."""

    run_id: str
    owner: str
    started_at: datetime
    finished_at: datetime
    outcome: str
    next_tick_in_s: float | None = None  # when the run is due again (None: leave as is)


def store_now(s: Session) -> datetime:
    """Now, as leases are stamped and compared: the database's clock on PostgreSQL (every
    process and host on one store agrees on it, whatever its own clock says), this process's
    on SQLite (one host). A value, read with a round-trip: for the occasional caller."""
    if s.get_bind().dialect.name == "postgresql":
        return s.scalar(select(func.clock_timestamp())).astimezone(UTC)  # type: ignore[union-attr]
    return utcnow()


def _clock(s: Session) -> Any:
    """`store_now` inside the statement itself (no extra round-trip on the worker's polls and
    heartbeats): the database's clock on PostgreSQL, this process's value on SQLite."""
    if s.get_bind().dialect.name == "postgresql":
        return func.clock_timestamp(type_=DateTime(timezone=True))
    return utcnow()


def _free(now: Any):  # type: ignore[no-untyped-def]
    return or_(RunRow.lease_owner.is_(None), RunRow.lease_expires_at < now)


def acquire(s: Session, run_id: str, owner: str, ttl_s: float) -> bool:
    """Take the lease on one run if nobody holds it (or theirs expired)."""
    now = _clock(s)
    result = s.execute(
        update(RunRow)
        .where(RunRow.id == run_id, _free(now))
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    taken = result.rowcount == 1  # type: ignore[attr-defined]
    if taken:
        _restamp(s, [run_id], owner, ttl_s)
    return taken


def _restamp(s: Session, run_ids: list[str], owner: str, ttl_s: float) -> None:
    """On SQLite, run the leases just taken from now: their expiry was computed before the
    statement waited for the write lock (up to the busy timeout, longer than an API lease), so a
    lease could be taken already lapsed, free for anyone. The lock is held now, until commit:
    nobody can take them in between. (On PostgreSQL the statement reads the database's clock.)"""
    if not run_ids or s.get_bind().dialect.name == "postgresql":
        return
    s.execute(
        update(RunRow)
        .where(RunRow.id.in_(run_ids), RunRow.lease_owner == owner)
        .values(lease_expires_at=utcnow() + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )


def acquire_due(
    s: Session, owner: str, ttl_s: float, limit: int, exclude: Collection[str] = ()
) -> list[str]:
    """Lease up to `limit` running runs that are due for a tick, oldest due first, in one
    statement; return their ids. On PostgreSQL rows locked by another worker are skipped.

    `exclude`: runs the caller still ticks or has not yet released. Their leases may have
    lapsed (a release held up, a stalled loop), but leased again under the same owner, the
    earlier tick's late release (or renewal) would count for the new one: the run would be
    freed, or ticked twice at once, under a lease that looks held."""
    if limit <= 0:
        return []
    now = _clock(s)
    due = (
        select(RunRow.id)
        .where(RunRow.status == RunStatus.running, RunRow.next_tick_at <= now, _free(now))
        .order_by(RunRow.next_tick_at)
        .limit(limit)
    )
    if exclude:
        due = due.where(RunRow.id.not_in(list(exclude)))
    if s.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    statement = (
        update(RunRow)
        .where(RunRow.id.in_(due.scalar_subquery()), _free(now))
        .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=ttl_s))
        .returning(RunRow.id)
        .execution_options(synchronize_session=False)
    )
    taken = list(s.scalars(statement))
    _restamp(s, taken, owner, ttl_s)
    return taken


def renew(s: Session, run_id: str, owner: str, ttl_s: float) -> bool:
    now = _clock(s)
    result = s.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=ttl_s))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def renew_many(s: Session, run_ids: Iterable[str], owner: str, ttl_s: float) -> set[str]:
    """Heartbeat: extend this owner's leases on `run_ids`; return the ids still held."""
    ids = list(run_ids)
    if not ids:
        return set()
    now = _clock(s)
    statement = (
        update(RunRow)
        .where(RunRow.id.in_(ids), RunRow.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=ttl_s))
        .returning(RunRow.id)
        .execution_options(synchronize_session=False)
    )
    return set(s.scalars(statement))


def release(s: Session, run_id: str, owner: str, next_tick_in_s: float | None = None) -> None:
    values: dict[str, object] = {"lease_owner": None, "lease_expires_at": None}
    if next_tick_in_s is not None:
        values["next_tick_at"] = store_now(s) + timedelta(seconds=next_tick_in_s)
    s.execute(
        update(RunRow)
        .where(RunRow.id == run_id, RunRow.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def release_many(s: Session, owner: str, run_ids: Iterable[str]) -> None:
    """Give back leases without ticking (e.g. leased, then the worker was told to stop)."""
    ids = list(run_ids)
    if ids:
        s.execute(
            update(RunRow)
            .where(RunRow.id.in_(ids), RunRow.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )


def finish(s: Session, ticks: Sequence[TickRecord]) -> None:
    """Record ticks in the tick log and release their leases (one executemany each).

    A lease that was lost meanwhile (expired and taken by another) is left to its new holder,
    but the tick is logged all the same: the log is the truth about who ticked when."""
    if not ticks:
        return
    now = store_now(s)
    s.execute(
        insert(TickLogRow),
        [
            {
                "run_id": t.run_id,
                "owner": t.owner,
                "started_at": t.started_at,
                "finished_at": t.finished_at,
                "outcome": t.outcome[:OUTCOME_MAX],
            }
            for t in ticks
        ],
    )
    rescheduled = [t for t in ticks if t.next_tick_in_s is not None]
    if rescheduled:
        s.connection().execute(
            update(RunRow.__table__)
            .where(
                RunRow.__table__.c.id == bindparam("b_id"),
                RunRow.__table__.c.lease_owner == bindparam("b_owner"),
            )
            .values(lease_owner=None, lease_expires_at=None, next_tick_at=bindparam("b_next")),
            [
                {
                    "b_id": t.run_id,
                    "b_owner": t.owner,
                    "b_next": now + timedelta(seconds=t.next_tick_in_s or 0.0),
                }
                for t in rescheduled
            ],
        )
    for t in ticks:
        if t.next_tick_in_s is None:
            release(s, t.run_id, t.owner)


def holder(s: Session, run_id: str) -> str | None:
    """Who holds the run's lease now (None: nobody, or the run does not exist)."""
    row = s.execute(
        select(RunRow.lease_owner, RunRow.lease_expires_at).where(RunRow.id == run_id)
    ).first()
    if row is None or row.lease_owner is None:
        return None
    if row.lease_expires_at is not None and row.lease_expires_at < store_now(s):
        return None
    return row.lease_owner


def prune_tick_log(s: Session, *, older_than_s: float, limit: int = 10_000) -> int:
    """Delete up to `limit` tick log rows that finished more than `older_than_s` ago (oldest
    first); return how many. Called periodically, it keeps the log to a window of history."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    oldest = (
        select(TickLogRow.id)
        .where(TickLogRow.finished_at < cutoff)
        .order_by(TickLogRow.finished_at)  # ix_tick_log_finished: the oldest, read off the index
        .limit(limit)
    )
    result = s.execute(
        delete(TickLogRow)
        .where(TickLogRow.id.in_(oldest.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def tick_log_mark(s: Session) -> int:
    """The newest tick log id (0: none): where `trim_tick_log_runs` starts looking."""
    return int(s.scalar(select(func.max(TickLogRow.id))) or 0)


def trim_tick_log_runs(
    s: Session, *, keep: int, since_id: int, runs_limit: int = 500
) -> tuple[int, int]:
    """Keep at most `keep` tick log rows per run (its newest): for each run ticked since the
    tick log id `since_id` (up to `runs_limit` runs; the rest next time), delete its older rows.
    Return (rows deleted, the id to pass as `since_id` next time). Each run's trim is one index
    range (`ix_tick_log_run`), so the cost follows the write rate, not the log's size."""
    recent = s.execute(
        select(TickLogRow.run_id, func.max(TickLogRow.id))
        .where(TickLogRow.id > since_id)
        .group_by(TickLogRow.run_id)
        .order_by(func.max(TickLogRow.id))
        .limit(runs_limit)
    ).all()
    if not recent:
        return 0, since_id
    deleted = 0
    for run_id, _newest in recent:
        # The started_at of the run's keep-th newest row: what is older goes.
        edge = s.scalar(
            select(TickLogRow.started_at)
            .where(TickLogRow.run_id == run_id)
            .order_by(TickLogRow.started_at.desc())
            .offset(keep - 1)
            .limit(1)
        )
        if edge is None:
            continue
        result = s.execute(
            delete(TickLogRow)
            .where(TickLogRow.run_id == run_id, TickLogRow.started_at < edge)
            .execution_options(synchronize_session=False)
        )
        deleted += int(result.rowcount or 0)  # type: ignore[attr-defined]
    return deleted, int(recent[-1][1])
