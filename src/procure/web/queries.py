"""The dashboard's reads of the store beyond `repo`: a page of runs with what each has spent and
where it runs now, and the newest observations of a run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from procure.models import ACTIVE_JOB_STATUSES, Observation, PaymentStatus, Run
from procure.store import keyset, repo, totals
from procure.store.keyset import Key
from procure.store.tables import JobRow, ObservationRow, PaymentRow, RunRow

M = TypeVar("M", bound=BaseModel)


def _as(cls: type[M], row: Any) -> M:
    return cls.model_validate({c.key: getattr(row, c.key) for c in row.__mapper__.column_attrs})


@dataclass(frozen=True)
class RunRowView:
    run: Run
    spent: int  # micro-USD of settled payments
    vendor_now: str | None  # the active job's vendor, else the last job's


@dataclass(frozen=True)
class RunsPage:
    """One page of runs, newest first, with the cursors of the pages beside it (keyset: no page
    numbers, no OFFSET); `total`: runs of the shown status (from the store's running totals)."""

    rows: list[RunRowView]
    total: int
    per_page: int
    newer: str | None  # cursor for `?after=`: the page of newer runs (None: this is the first)
    older: str | None  # cursor for `?before=`: the page of older runs (None: this is the last)


def runs_page(
    s: Session,
    *,
    status: str | None,
    per_page: int,
    before: Key | None = None,
    after: Key | None = None,
    oldest: bool = False,
) -> RunsPage:
    """Runs newest first, one page: the newest, those just older than `before`, those just
    newer than `after`, or (`oldest`) the oldest; with spent to date and the vendor now."""
    if after is not None or oldest:
        found = keyset.runs(s, limit=per_page, after=after, status=status, newest_first=False)
        rows = list(reversed(found.rows))
        newer_left = found.next is not None
        older_left = not oldest  # came from an older page (`after`): there is one
    else:
        found = keyset.runs(s, limit=per_page, after=before, status=status)
        rows = found.rows
        newer_left = before is not None
        older_left = found.next is not None
    key = [keyset.Key(r.created_at, r.id) for r in rows]
    runs = [_as(Run, r) for r in rows]
    ids = [r.id for r in rows]
    spent = spent_by_run(s, ids)
    vendors = vendors_now(s, ids)
    views = [RunRowView(run, spent.get(run.id, 0), vendors.get(run.id)) for run in runs]
    counts = totals.runs_by_status(s)
    total = counts.get(status, 0) if status else sum(counts.values())
    return RunsPage(
        views,
        total,
        per_page,
        newer=key[0].encode() if key and newer_left else None,
        older=key[-1].encode() if key and older_left else None,
    )


def spent_by_run(s: Session, run_ids: list[str]) -> dict[str, int]:
    if not run_ids:
        return {}
    # The status goes in the sum, not the WHERE: with it there, SQLite's planner (no
    # statistics) reads every completed payment by the status index instead of the page's.
    settled = case((PaymentRow.status == PaymentStatus.completed, PaymentRow.amount), else_=0)
    rows = s.execute(
        select(PaymentRow.run_id, func.sum(settled))
        .where(PaymentRow.run_id.in_(run_ids))
        .group_by(PaymentRow.run_id)
    )
    return {run_id: int(total or 0) for run_id, total in rows}


def vendors_now(s: Session, run_ids: list[str]) -> dict[str, str]:
    """Each run's active job's vendor; for a run with none active, its latest job's."""
    if not run_ids:
        return {}
    rows = s.execute(
        select(JobRow.run_id, JobRow.vendor_id, JobRow.status)
        .where(JobRow.run_id.in_(run_ids))
        .order_by(JobRow.created_at)
    )
    latest: dict[str, str] = {}
    active: dict[str, str] = {}
    for run_id, vendor_id, status in rows:
        latest[run_id] = vendor_id
        if status in ACTIVE_JOB_STATUSES:
            active[run_id] = vendor_id
    return {**latest, **active}


def latest_observations(s: Session, run_id: str, limit: int) -> list[Observation]:
    """The newest `limit` observations of a run, oldest first (the page shows the tail; the
    live stream carries on from the last id)."""
    rows = list(
        s.scalars(
            select(ObservationRow)
            .where(repo.of_run(run_id))
            .order_by(*repo.NEWEST_BY_RUN_AND_ID)
            .limit(limit)
        )
    )
    return [_as(Observation, r) for r in reversed(rows)]


def next_tick_at(s: Session, run_id: str) -> datetime | None:
    """When a worker next ticks the run (its lease's due time), if ever set."""
    return s.scalar(select(RunRow.next_tick_at).where(RunRow.id == run_id))
