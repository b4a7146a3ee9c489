"""The SQLAlchemy tables: the seeds' documents (runs, jobs, payments, observations, vendors)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Money columns are integer micro-USD: exact sums on every backend.


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # PostgreSQL answers in the session's time zone (the server's, or PGTZ): the same
        # instant, turned to UTC, as every page and answer prints it.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime(), dict[str, Any]: JSON}


class VendorRow(Base):
    __tablename__ = "vendors"

    vendor_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(500))
    base_price_per_hour: Mapped[int] = mapped_column(BigInteger)
    reliability_score: Mapped[float] = mapped_column(Float)
    supported_gpu_types: Mapped[list[str]] = mapped_column(JSON)
    pay_to: Mapped[str | None] = mapped_column(String(64))
    network: Mapped[str | None] = mapped_column(String(64))
    asset: Mapped[str | None] = mapped_column(String(64))
    successes: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    gpu_hours: Mapped[float] = mapped_column(Float, default=0.0)
    cooldown_until: Mapped[datetime | None]
    # The vendor's own bearer credential, encrypted (procure.vendors.credentials); None: none.
    credential: Mapped[str | None] = mapped_column(Text)
    # "x402", or "cloud": a cloud account, what it may rent in `cloud` (models.CloudTerms).
    kind: Mapped[str] = mapped_column(String(8), default="x402", server_default="x402")
    cloud: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))
    goal: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    budget_total: Mapped[int] = mapped_column(BigInteger)
    budget_remaining: Mapped[int] = mapped_column(BigInteger)
    job_spec: Mapped[dict[str, Any]]
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    status_reason: Mapped[str | None] = mapped_column(Text)
    deadline: Mapped[datetime | None]
    # A user asked to stop the run: the next tick cancels its job and ends it `cancelled`.
    cancel_requested_at: Mapped[datetime | None]
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    # Ticks in a row that found no way forward; past a bound the run ends `failed`.
    troubles: Mapped[int] = mapped_column(Integer, default=0)
    # Vendor log lines kept as observations; past a bound the rest are counted, not kept.
    log_lines: Mapped[int] = mapped_column(Integer, default=0)
    # Worker lease: who may tick this run, until when, and when it is next due.
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None]
    next_tick_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_runs_due", "status", "next_tick_at"),
        Index("ix_runs_created", "created_at", "id"),
        Index("ix_runs_status_created", "status", "created_at", "id"),
    )


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    vendor_id: Mapped[str] = mapped_column(String(64))
    vendor_job_id: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    expected_cost: Mapped[int] = mapped_column(BigInteger)
    actual_cost: Mapped[int | None] = mapped_column(BigInteger)
    job_params: Mapped[dict[str, Any]]
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    quote_id: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    artifact_url: Mapped[str | None] = mapped_column(String(500))
    metrics: Mapped[dict[str, Any] | None]
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    log_cursor: Mapped[int] = mapped_column(Integer, default=0)
    # Checkpoint resume: where this job started from and the latest checkpoint it saved.
    start_progress: Mapped[float] = mapped_column(Float, default=0.0)
    checkpoint_url: Mapped[str | None] = mapped_column(String(500))
    checkpoint_progress: Mapped[float] = mapped_column(Float, default=0.0)
    slice_hours: Mapped[float | None] = mapped_column(Float)
    # When the vendor last reported more progress (None: not since it started).
    progressed_at: Mapped[datetime | None]
    # When a poll first saw the job running (None: not yet, or never): its start-up is the time
    # from `created_at` to here, which the planner learns per vendor (migration 0017).
    started_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]

    __table_args__ = (
        # The jobs seen starting, newest first (`repo.recent_startups`, read before each plan):
        # partial, so the rows that never started (all those from before 0017) are not in it.
        Index(
            "ix_jobs_started",
            "started_at",
            sqlite_where=text("started_at IS NOT NULL"),
            postgresql_where=text("started_at IS NOT NULL"),
        ),
    )


class PaymentRow(Base):
    __tablename__ = "payments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    vendor_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    x402_tx_id: Mapped[str | None] = mapped_column(String(100))
    nonce: Mapped[str] = mapped_column(String(66), unique=True)
    pay_to: Mapped[str | None] = mapped_column(String(64))
    hours: Mapped[float | None] = mapped_column(Float)
    error_message: Mapped[str | None] = mapped_column(Text)
    # When the vendor holding this payment asked to be asked again (its Retry-After while it
    # settles); None when no vendor asked.
    ask_again_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_payments_status_created", "status", "created_at", "id"),
        Index("ix_payments_created", "created_at", "id"),
        # Cloud instances' payments only (migration 0016): the spend ledger's cap check reads
        # these over months, never the x402 payments beside them (`ledger.cloud_spent`).
        Index(
            "ix_payments_cloud_created",
            "created_at",
            sqlite_where=text("nonce LIKE 'cloud-%'"),
            postgresql_where=text("nonce LIKE 'cloud-%'"),
        ),
        # Those made before a cap's window that may reach into it (migration 0019): the bills
        # booked in it (by booking, then creation), and the rare ones of more than 24 hours
        # (`ledger._straddlers`).
        Index(
            "ix_payments_cloud_booked",
            "updated_at",
            "created_at",
            sqlite_where=text("nonce LIKE 'cloud-%' AND updated_at > created_at"),
            postgresql_where=text("nonce LIKE 'cloud-%' AND updated_at > created_at"),
        ),
        Index(
            "ix_payments_cloud_long",
            "created_at",
            sqlite_where=text("nonce LIKE 'cloud-%' AND hours > 24"),
            postgresql_where=text("nonce LIKE 'cloud-%' AND hours > 24"),
        ),
    )


class ObservationRow(Base):
    __tablename__ = "observations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    type: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    vendor_id: Mapped[str | None] = mapped_column(String(64))
    timestamp: Mapped[datetime]

    __table_args__ = (Index("ix_observations_run_id_id", "run_id", "id"),)


class TickLogRow(Base):
    """One row per tick, written when its lease is released: who ticked which run, from when to
    when, with what outcome. Intervals of one run never overlap (invariant 4), and this is how
    the tests prove it; it is also the run's tick history for operators."""

    __tablename__ = "tick_log"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(String(32))
    owner: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    outcome: Mapped[str] = mapped_column(String(100))

    __table_args__ = (
        Index("ix_tick_log_run", "run_id", "started_at"),
        Index("ix_tick_log_finished", "finished_at"),
    )


class StoreTotalRow(Base):
    """Running totals (`runs:<status>`, `payments:<status>`, `micros:<status>`), one row per
    change written by triggers in the writer's transaction (migration 0008); their sum per name
    is the total, folded into one row per name now and then (procure.store.totals)."""

    __tablename__ = "store_totals"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    name: Mapped[str] = mapped_column(String(64), index=True)
    value: Mapped[int] = mapped_column(BigInteger)


class RevokedSessionRow(Base):
    """A dashboard session logged out before its cookie expired: refused from then on, by every
    server over this store and after a restart. Only a valid signed, logged-in session is ever
    written (one row per logout), and a row is purged once its session would have expired
    anyway (issued more than the session's max age ago), so the table stays small."""

    __tablename__ = "revoked_sessions"

    sid: Mapped[str] = mapped_column(String(32), primary_key=True)
    issued_at: Mapped[datetime] = mapped_column(index=True)
