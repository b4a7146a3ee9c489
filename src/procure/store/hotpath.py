"""The worker's batched hot path: the state of a batch of leased runs read in one go, and the
progress of the batch's plain polls written in one go, fenced by the worker's leases.

A plain poll (the job runs, nothing to decide) only moves the job's progress, log cursor and
checkpoint, the run's progress, and keeps the vendor's new log lines. The tick hands that to
the worker as a `PollWrite` instead of writing it; the worker writes the writes of many ticks
in the transaction that also logs the ticks and releases their leases, after checking, under a
row lock, that it still holds each lease: a write whose lease was lost is dropped, and the new
holder polls again from the last written cursor (nothing lost, nothing kept twice).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from procure.bounds import clip
from procure.models import Job, ObservationType, Payment, Run, RunState, Vendor, utcnow
from procure.store.tables import JobRow, ObservationRow, PaymentRow, RunRow, VendorRow

_runs, _jobs, _payments, _vendors, _observations = (
    RunRow.__table__,
    JobRow.__table__,
    PaymentRow.__table__,
    VendorRow.__table__,
    ObservationRow.__table__,
)
# A poll's two writes, built once (no per-call construction or cache-key generation).
_JOB_POLLED = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job_id"))
    .values(
        log_cursor=bindparam("log_cursor"),
        progress=bindparam("progress"),
        checkpoint_url=bindparam("checkpoint_url"),
        checkpoint_progress=bindparam("checkpoint_progress"),
        progressed_at=bindparam("progressed_at"),
        # Set once, by the first poll that saw the job running; never moved by a later one. (The
        # column's type on the parameter: inside a function it would not be inferred, and SQLite
        # would keep the time in another text form than every other time in the store.)
        started_at=func.coalesce(
            _jobs.c.started_at, bindparam("started_at", type_=_jobs.c.started_at.type)
        ),
        updated_at=bindparam("now"),
    )
)
_RUN_POLLED = (
    update(_runs)
    .where(_runs.c.id == bindparam("run_id"))
    .values(
        progress=bindparam("progress"),
        log_lines=_runs.c.log_lines + bindparam("lines"),
        updated_at=bindparam("now"),
    )
)


@dataclass
class PollWrite:
    """What a poll writes: the job's log cursor, progress, checkpoint and when it last
    progressed, the run's progress and `log_lines` more lines kept, and the new log lines and
    notes, as (type, content, vendor_id); and when the job was seen running (`started_at`),
    which is kept only where the job has no such time yet."""

    run_id: str
    job_id: str
    log_cursor: int
    progress: float
    checkpoint_url: str | None
    checkpoint_progress: float
    progressed_at: datetime | None
    log_lines: int = 0
    observations: list[tuple[ObservationType, str, str | None]] = field(default_factory=list)
    started_at: datetime | None = None


def load_tick_states(s: Session, run_ids: Sequence[str]) -> dict[str, RunState]:
    """`repo.load_tick_state` for many runs: three selects (runs, their jobs, their payments),
    whatever the number of runs. Runs not found are absent from the answer."""
    if not run_ids:
        return {}
    ids = list(run_ids)
    conn = s.connection()
    runs = conn.execute(select(_runs).where(_runs.c.id.in_(ids))).mappings().all()
    jobs = (
        conn.execute(select(_jobs).where(_jobs.c.run_id.in_(ids)).order_by(_jobs.c.created_at))
        .mappings()
        .all()
    )
    payments = (
        conn.execute(
            select(_payments).where(_payments.c.run_id.in_(ids)).order_by(_payments.c.created_at)
        )
        .mappings()
        .all()
    )
    states = {
        row["id"]: RunState(
            run=Run.model_validate(dict(row)), jobs=[], payments=[], observations=[]
        )
        for row in runs
    }
    for row in jobs:
        states[row["run_id"]].jobs.append(Job.model_validate(dict(row)))
    for row in payments:
        states[row["run_id"]].payments.append(Payment.model_validate(dict(row)))
    return states


def load_vendors(s: Session, vendor_ids: Iterable[str]) -> dict[str, Vendor]:
    """The registry entries of `vendor_ids`, in one select."""
    ids = sorted(set(vendor_ids))
    if not ids:
        return {}
    rows = s.connection().execute(select(_vendors).where(_vendors.c.vendor_id.in_(ids)))
    return {row["vendor_id"]: Vendor.model_validate(dict(row)) for row in rows.mappings()}


def held_leases(s: Session, owner: str, run_ids: Iterable[str]) -> set[str]:
    """Of `run_ids`, those whose lease `owner` still holds, locked (PostgreSQL: FOR UPDATE) until
    the end of the transaction, so that nobody takes them between this check and the writes."""
    ids = sorted(set(run_ids))
    if not ids:
        return set()
    query = select(_runs.c.id).where(_runs.c.id.in_(ids), _runs.c.lease_owner == owner)
    if s.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    return set(s.connection().execute(query).scalars())


def apply_polls(s: Session, writes: Sequence[PollWrite]) -> None:
    """Write polls (the caller holds their leases): two UPDATEs and one INSERT of their log
    lines, executemany whatever the number of polls; Core statements on the session's
    connection (no ORM synchronisation: no loaded rows of these tables may be in `s`)."""
    if not writes:
        return
    now = utcnow()
    conn = s.connection()
    conn.execute(
        _JOB_POLLED,
        [
            {
                "job_id": w.job_id,
                "log_cursor": w.log_cursor,
                "progress": w.progress,
                "checkpoint_url": w.checkpoint_url,
                "checkpoint_progress": w.checkpoint_progress,
                "progressed_at": w.progressed_at,
                "started_at": w.started_at,
                "now": now,
            }
            for w in writes
        ],
    )
    conn.execute(
        _RUN_POLLED,
        [
            {"run_id": w.run_id, "progress": w.progress, "lines": w.log_lines, "now": now}
            for w in writes
        ],
    )
    lines = [
        {
            "run_id": w.run_id,
            "type": str(kind),
            "content": clip(content),
            "vendor_id": vendor_id,
            "timestamp": now,
        }
        for w in writes
        for kind, content, vendor_id in w.observations
    ]
    if lines:
        conn.execute(insert(_observations), lines)
