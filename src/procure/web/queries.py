"""The dashboard's reads of the store beyond `repo`: a page of runs with what each has spent and
where it runs now, and the newest observations of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from procure.models import ACTIVE_JOB_STATUSES, Observation, PaymentStatus, Run
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
    rows: list[RunRowView]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


def runs_page(s: Session, *, status: str | None, page: int, per_page: int) -> RunsPage:
    """Runs newest first, one page of them, with spent to date and the vendor now."""
    count = select(func.count()).select_from(RunRow)
    query = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id)
    if status:
        count = count.where(RunRow.status == status)
        query = query.where(RunRow.status == status)
    total = int(s.scalar(count) or 0)
    rows = list(s.scalars(query.offset((page - 1) * per_page).limit(per_page)))
    runs = [_as(Run, r) for r in rows]
    ids = [r.id for r in rows]
    spent = spent_by_run(s, ids)
    vendors = vendors_now(s, ids)
    views = [RunRowView(run, spent.get(run.id, 0), vendors.get(run.id)) for run in runs]
    return RunsPage(views, total, page, per_page)


def spent_by_run(s: Session, run_ids: list[str]) -> dict[str, int]:
    if not run_ids:
        return {}
    rows = s.execute(
        select(PaymentRow.run_id, func.sum(PaymentRow.amount))
        .where(PaymentRow.run_id.in_(run_ids), PaymentRow.status == PaymentStatus.completed)
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
            .where(ObservationRow.run_id == run_id)
            .order_by(ObservationRow.id.desc())
            .limit(limit)
        )
    )
    return [_as(Observation, r) for r in reversed(rows)]
