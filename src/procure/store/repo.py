"""The store's interface: plain functions over a Session that read and write domain models."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, bindparam, case, func, select, tuple_, update
from sqlalchemy.orm import Session

from procure.bounds import clip
from procure.models import (
    ACTIVE_JOB_STATUSES,
    CLOUD_NONCE_PREFIX,
    TERMINAL_RUN_STATUSES,
    Job,
    JobSpec,
    Observation,
    ObservationType,
    Payment,
    Run,
    RunState,
    RunStatus,
    Vendor,
    utcnow,
)
from procure.store import leases, totals
from procure.store.tables import Base, JobRow, ObservationRow, PaymentRow, RunRow, VendorRow

M = TypeVar("M", bound=BaseModel)


def new_id() -> str:
    return uuid.uuid4().hex[:24]


def _columns(row: Base) -> dict[str, Any]:
    return {c.key: getattr(row, c.key) for c in row.__mapper__.column_attrs}


def _model(cls: type[M], row: Base) -> M:
    return cls.model_validate(_columns(row))


def row_model(cls: type[M], row: Base) -> M:
    """The domain model of a table row (e.g. a page of `procure.store.keyset`)."""
    return _model(cls, row)


# --- vendors -------------------------------------------------------------------------------


def save_vendor(s: Session, vendor: Vendor, *, clear_credential: bool = False) -> Vendor:
    """Insert or replace a vendor's registry entry, keeping its learned outcomes.

    `vendor.credential` (already encrypted) replaces the stored one when given. When it is not
    given, the stored credential is kept only if the endpoint is unchanged: a credential is
    bound to the endpoint it was registered for, so moving the vendor elsewhere drops it.
    `clear_credential` drops it in any case.
    """
    row = s.get(VendorRow, vendor.vendor_id)
    data = vendor.model_dump(
        exclude={"successes", "failures", "gpu_hours", "cooldown_until", "has_credential"}
    )
    if row is None:
        row = VendorRow(
            **vendor.model_dump(exclude={"has_credential"}), credential=vendor.credential
        )
        s.add(row)
    else:
        if vendor.credential is not None:
            row.credential = vendor.credential
        elif clear_credential or row.endpoint != vendor.endpoint:
            row.credential = None
        data.pop("created_at")
        data["updated_at"] = utcnow()
        for key, value in data.items():
            setattr(row, key, value)
    s.flush()
    return _model(Vendor, row)


def list_vendors(s: Session) -> list[Vendor]:
    rows = s.scalars(select(VendorRow).order_by(VendorRow.vendor_id))
    return [_model(Vendor, r) for r in rows]


def get_vendor(s: Session, vendor_id: str) -> Vendor | None:
    row = s.get(VendorRow, vendor_id)
    return _model(Vendor, row) if row else None


def record_vendor_outcome(
    s: Session,
    vendor_id: str,
    *,
    success: bool,
    gpu_hours: float = 0.0,
    cooldown_until: datetime | None = None,
) -> None:
    """Count a success or failure against a vendor (atomic increments, safe under concurrency)."""
    values: dict[str, Any] = {
        "gpu_hours": VendorRow.gpu_hours + gpu_hours,
        "updated_at": utcnow(),
    }
    if success:
        values["successes"] = VendorRow.successes + 1
    else:
        values["failures"] = VendorRow.failures + 1
        if cooldown_until is not None:
            values["cooldown_until"] = cooldown_until
    s.execute(update(VendorRow).where(VendorRow.vendor_id == vendor_id).values(**values))


def record_vendor_hours(s: Session, vendor_id: str, gpu_hours: float) -> None:
    """GPU-hours a vendor ran without failing or finishing (a job stopped at a checkpoint)."""
    s.execute(
        update(VendorRow)
        .where(VendorRow.vendor_id == vendor_id)
        .values(gpu_hours=VendorRow.gpu_hours + gpu_hours, updated_at=utcnow())
    )


def cool_down(s: Session, vendor_id: str, until: datetime) -> None:
    """Keep planners off a vendor until `until` without counting a failure (it erred, e.g. had
    no capacity); an existing, later cool-down stands."""
    s.execute(
        update(VendorRow)
        .where(
            VendorRow.vendor_id == vendor_id,
            (VendorRow.cooldown_until.is_(None)) | (VendorRow.cooldown_until < until),
        )
        .values(cooldown_until=until, updated_at=utcnow())
    )


def clear_cooldown(s: Session, vendor_id: str) -> Vendor | None:
    """Let planners pick a vendor again now (an operator knows it is fixed); None if unknown."""
    s.execute(
        update(VendorRow)
        .where(VendorRow.vendor_id == vendor_id)
        .values(cooldown_until=None, updated_at=utcnow())
    )
    return get_vendor(s, vendor_id)


# --- runs ----------------------------------------------------------------------------------


def create_run(
    s: Session,
    *,
    user_id: str,
    goal: str,
    budget_total: int,
    job_spec: JobSpec,
    deadline: datetime | None = None,
) -> Run:
    now = utcnow()
    row = RunRow(
        id=new_id(),
        user_id=user_id,
        goal=goal,
        status=RunStatus.running,
        budget_total=budget_total,
        budget_remaining=budget_total,
        job_spec=job_spec.model_dump(),
        progress=0.0,
        deadline=deadline,
        # Due by the store's clock, as leases compare it: an API host whose clock runs ahead
        # would otherwise make a new run wait that long for its first tick.
        next_tick_at=leases.store_now(s),
        created_at=now,
        updated_at=now,
    )
    s.add(row)
    s.flush()
    return _model(Run, row)


def get_run(s: Session, run_id: str) -> Run | None:
    row = s.get(RunRow, run_id)
    return _model(Run, row) if row else None


def list_runs(s: Session, *, limit: int = 100, status: str | None = None) -> list[Run]:
    query = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
    if status:
        query = query.where(RunRow.status == status)
    return [_model(Run, r) for r in s.scalars(query)]


def update_run(s: Session, run_id: str, **values: Any) -> None:
    values["updated_at"] = utcnow()
    s.execute(update(RunRow).where(RunRow.id == run_id).values(**values))


def count_runs_by_status(s: Session) -> dict[str, int]:
    """Runs per status, from the running totals (constant time: procure.store.totals)."""
    return totals.runs_by_status(s)


# --- jobs and payments ---------------------------------------------------------------------


def insert_job(s: Session, job: Job) -> None:
    s.add(JobRow(**job.model_dump()))


def update_job(s: Session, job_id: str, **values: Any) -> None:
    values["updated_at"] = utcnow()
    s.execute(update(JobRow).where(JobRow.id == job_id).values(**values))


def insert_payment(s: Session, payment: Payment) -> None:
    s.add(PaymentRow(**payment.model_dump()))


def _ends_wait(values: dict[str, Any]) -> dict[str, Any]:
    """A new word on a payment, or its failure, ends any wait its vendor asked for (a completed
    payment keeps it: until then its seller may not have booked it)."""
    if "error_message" in values or values.get("status") == "failed":
        values.setdefault("ask_again_at", None)
    return values


def update_payment(s: Session, payment_id: str, **values: Any) -> None:
    _ends_wait(values)
    values["updated_at"] = utcnow()
    s.execute(update(PaymentRow).where(PaymentRow.id == payment_id).values(**values))


def list_payments(s: Session, *, status: str | None = None) -> list[Payment]:
    query = select(PaymentRow).order_by(PaymentRow.created_at)
    if status:
        query = query.where(PaymentRow.status == status)
    return [_model(Payment, r) for r in s.scalars(query)]


# --- observations (append-only) ------------------------------------------------------------


def add_observation(
    s: Session,
    run_id: str,
    type: ObservationType,
    content: str,
    *,
    vendor_id: str | None = None,
) -> None:
    if s.get_bind().dialect.name == "postgresql":
        # An id is taken at INSERT, not at commit: a writer outside the run's lease (a budget
        # warning, the sweeper, a cancel request) could commit a higher id while a tick's lower
        # one is still open, and a reader resuming after the last id it saw (the live timeline,
        # observationsAfter) would skip the lower one for good. Locked by the run's row, as its
        # UPDATEs lock it (the worker's batch of log lines holds it already): one run's ids are
        # handed out in commit order, and runs never wait on each other.
        s.execute(select(RunRow.id).where(RunRow.id == run_id).with_for_update(key_share=True))
    # Much of what is observed comes from outside (vendors' logs and errors, LLM answers):
    # no observation grows the store by more than a bounded text.
    s.add(
        ObservationRow(
            run_id=run_id,
            type=type,
            content=clip(content),
            vendor_id=vendor_id,
            timestamp=utcnow(),
        )
    )


# A run's observations are selected as a range of (run_id, id) row values, not as `run_id = X`:
# with the equality PostgreSQL may walk the primary key in id order and filter by run (its
# statistics say ids follow the table's order), reading every later observation of every run:
# 0.3 s for one page on a year of runs. Over the row-value range only the (run_id, id) index
# serves the query and its order: 1 ms.
_LAST_ID = 2**63 - 1
BY_RUN_AND_ID = (ObservationRow.run_id, ObservationRow.id)
NEWEST_BY_RUN_AND_ID = (ObservationRow.run_id.desc(), ObservationRow.id.desc())


def of_run(run_id: str, after_id: int = 0) -> ColumnElement[bool]:
    """The run's observations with an id above `after_id`, as an index range (see above)."""
    key = tuple_(ObservationRow.run_id, ObservationRow.id)
    return and_(key > tuple_(run_id, after_id), key <= tuple_(run_id, _LAST_ID))


def list_observations(
    s: Session, run_id: str, *, after_id: int = 0, limit: int | None = None
) -> list[Observation]:
    """A run's observations with an id above `after_id`, oldest first; at most `limit`."""
    query = select(ObservationRow).where(of_run(run_id, after_id)).order_by(*BY_RUN_AND_ID)
    if limit is not None:
        query = query.limit(limit)
    return [_model(Observation, r) for r in s.scalars(query)]


# --- the whole state of a run --------------------------------------------------------------


def load_state(
    s: Session,
    run_id: str,
    *,
    observations: bool = True,
    observations_after: int = 0,
    observations_limit: int | None = None,
) -> RunState | None:
    """The run with its jobs, payments and (optionally; ticks skip them) observations: all of
    them, or those with an id above `observations_after`, at most `observations_limit`."""
    run = get_run(s, run_id)
    if run is None:
        return None
    jobs = s.scalars(select(JobRow).where(JobRow.run_id == run_id).order_by(JobRow.created_at))
    payments = s.scalars(
        select(PaymentRow).where(PaymentRow.run_id == run_id).order_by(PaymentRow.created_at)
    )
    return RunState(
        run=run,
        jobs=[_model(Job, r) for r in jobs],
        payments=[_model(Payment, r) for r in payments],
        observations=list_observations(
            s, run_id, after_id=observations_after, limit=observations_limit
        )
        if observations
        else [],
    )


def load_state_page(
    s: Session, run_id: str, *, observations_after: int = 0, limit: int = 1000
) -> tuple[RunState, int | None] | None:
    """`load_state` with one page of at most `limit` observations after the cursor
    `observations_after`, and the cursor of the next page (None when this one is the last)."""
    state = load_state(
        s, run_id, observations_after=observations_after, observations_limit=limit + 1
    )
    if state is None:
        return None
    if len(state.observations) <= limit:
        return state, None
    del state.observations[limit:]
    return state, state.observations[-1].id


# The tick's hot statements, built once (no per-call construction or cache-key generation).
_runs, _jobs, _payments, _vendors = (
    RunRow.__table__,
    JobRow.__table__,
    PaymentRow.__table__,
    VendorRow.__table__,
)
_RUN_BY_ID = select(_runs).where(_runs.c.id == bindparam("run_id"))
_JOBS_OF_RUN = (
    select(_jobs).where(_jobs.c.run_id == bindparam("run_id")).order_by(_jobs.c.created_at)
)
_PAYMENTS_OF_RUN = (
    select(_payments)
    .where(_payments.c.run_id == bindparam("run_id"))
    .order_by(_payments.c.created_at)
)
_VENDOR_BY_ID = select(_vendors).where(_vendors.c.vendor_id == bindparam("vendor_id"))


def load_tick_state(s: Session, run_id: str) -> RunState | None:
    """`load_state` without observations, for a tick at the start of its own session: Core
    selects of the three tables (no ORM objects, no identity map), each row validated straight
    into its model. Nothing may be pending in `s` (a Core select does not autoflush)."""
    conn = s.connection()
    key = {"run_id": run_id}
    row = conn.execute(_RUN_BY_ID, key).mappings().first()
    if row is None:
        return None
    job_rows = conn.execute(_JOBS_OF_RUN, key).mappings().all()
    payment_rows = conn.execute(_PAYMENTS_OF_RUN, key).mappings().all()
    return RunState(
        run=Run.model_validate(dict(row)),
        jobs=[Job.model_validate(dict(r)) for r in job_rows],
        payments=[Payment.model_validate(dict(r)) for r in payment_rows],
        observations=[],
    )


def get_vendor_row(s: Session, vendor_id: str) -> Vendor | None:
    """`get_vendor` by a Core select (a tick polling a job needs only the job's vendor)."""
    row = s.connection().execute(_VENDOR_BY_ID, {"vendor_id": vendor_id}).mappings().first()
    return Vendor.model_validate(dict(row)) if row else None


def refresh_budget(s: Session, run_id: str) -> int:
    """Set the run's budgetRemaining to budgetTotal minus its completed payments; return it."""
    # The status in the sum, not the WHERE: the run's few payments, by its index, whatever
    # a planner guesses of the status index's selectivity.
    settled = case((PaymentRow.status == "completed", PaymentRow.amount), else_=0)
    paid = s.scalar(select(func.coalesce(func.sum(settled), 0)).where(PaymentRow.run_id == run_id))
    run = s.get(RunRow, run_id)
    assert run is not None
    run.budget_remaining = run.budget_total - int(paid or 0)
    run.updated_at = utcnow()
    return run.budget_remaining


def vendor_error_counts(s: Session, run_id: str) -> dict[str, int]:
    """Error observations per vendor in one run: the planner's memory of trouble this run."""
    rows = s.execute(
        select(ObservationRow.vendor_id, func.count())
        .where(
            ObservationRow.run_id == run_id,
            ObservationRow.type == ObservationType.error,
            ObservationRow.vendor_id.is_not(None),
        )
        .group_by(ObservationRow.vendor_id)
    )
    return {vendor_id: n for vendor_id, n in rows}


def recent_startups(s: Session, limit: int = 200) -> list[tuple[str, datetime, datetime]]:
    """(vendor_id, created_at, started_at) of the `limit` jobs most recently seen running, of
    any run, newest first: what the planner learns each vendor's start-up from. One bounded
    read by the partial index `ix_jobs_started` (its WHERE clause is implied by this one's)."""
    rows = s.execute(
        select(JobRow.vendor_id, JobRow.created_at, JobRow.started_at)
        .where(JobRow.started_at.is_not(None))
        .order_by(JobRow.started_at.desc())
        .limit(limit)
    )
    return [(vendor_id, created, started) for vendor_id, created, started in rows]


# --- payments left in doubt when their run ended ------------------------------------------


def pending_payments_of_ended_runs(s: Session, *, limit: int = 50) -> list[Payment]:
    """Payments still pending (in doubt: a signed authorisation that may yet settle) on runs
    that have ended; oldest first."""
    query = (
        select(PaymentRow)
        .join(RunRow, RunRow.id == PaymentRow.run_id)
        .where(
            PaymentRow.status == "pending",
            RunRow.status.in_([str(status) for status in TERMINAL_RUN_STATUSES]),
            # cloud reservations are booked from the provider's bill, not the x402 ledger
            ~PaymentRow.nonce.startswith(CLOUD_NONCE_PREFIX),
        )
        .order_by(PaymentRow.created_at)
        .limit(limit)
    )
    return [_model(Payment, r) for r in s.scalars(query)]


def settle_pending_payment(s: Session, payment_id: str, **values: Any) -> bool:
    """Record a pending payment's fate, unless someone already did; True if this call did."""
    _ends_wait(values)
    values["updated_at"] = utcnow()
    result = s.execute(
        update(PaymentRow)
        .where(PaymentRow.id == payment_id, PaymentRow.status == "pending")
        .values(**values)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def last_observation(s: Session, run_id: str, type: ObservationType) -> str | None:
    """The content of the run's latest observation of `type`, if any."""
    return s.scalar(
        select(ObservationRow.content)
        .where(of_run(run_id), ObservationRow.type == type)
        .order_by(*NEWEST_BY_RUN_AND_ID)
        .limit(1)
    )


def recent_contents(s: Session, run_id: str, limit: int = 4) -> list[str]:
    """The contents of the run's latest `limit` observations, newest first (to say a repeated
    thing once: a run waiting tick after tick for the same reason)."""
    return list(
        s.scalars(
            select(ObservationRow.content)
            .where(of_run(run_id))
            .order_by(*NEWEST_BY_RUN_AND_ID)
            .limit(limit)
        )
    )


def vendor_job_held(s: Session, vendor_id: str, vendor_job_id: str, *, but: str) -> bool:
    """Whether a live job of ours other than `but` (any run) runs as `vendor_job_id` at
    `vendor_id`."""
    query = select(JobRow.id).where(
        JobRow.vendor_id == vendor_id,
        JobRow.vendor_job_id == vendor_job_id,
        JobRow.id != but,
        JobRow.status.in_([str(status) for status in ACTIVE_JOB_STATUSES]),
    )
    return s.scalars(query.limit(1)).first() is not None
