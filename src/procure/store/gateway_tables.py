"""The gateway's own book: quotes it gave, jobs it sold, payments it received and the instances it
launched for them (`procure.gateway`). Money columns are integer micro-USD."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from procure.store.tables import Base


class GatewayQuoteRow(Base):
    """A price given to a buyer; a 402 for it never asks for more than `amount`."""

    __tablename__ = "gateway_quotes"

    quote_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    gpu: Mapped[str] = mapped_column(String(32))
    hours: Mapped[float] = mapped_column(Float)
    price_per_hour: Mapped[int] = mapped_column(BigInteger)  # what the buyer pays, per hour
    amount: Mapped[int] = mapped_column(BigInteger)
    cost_per_hour: Mapped[int] = mapped_column(BigInteger)  # the cloud's offer it was priced on
    offer: Mapped[dict[str, Any]]
    expires_at: Mapped[datetime] = mapped_column(index=True)
    created_at: Mapped[datetime]


class GatewayJobRow(Base):
    """One sold job: written `unpaid` once a verified payment reached the route (before it is
    settled), `paid` in the transaction that records the settlement, then driven by the
    gateway's loop (launching → booting → running → ending) until it is terminal."""

    __tablename__ = "gateway_jobs"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)  # the buyer's Idempotency-Key
    quote_id: Mapped[str] = mapped_column(String(32))
    gpu: Mapped[str] = mapped_column(String(32))
    payer: Mapped[str] = mapped_column(String(64), index=True)  # the buyer, as its wallet
    nonce: Mapped[str] = mapped_column(String(80), unique=True)  # of the submit's payment
    params: Mapped[dict[str, Any]]
    resume_from: Mapped[str | None] = mapped_column(String(500))
    # unpaid | paid | launching | booting | running | ending | completed | failed | cancelled
    # | expired
    status: Mapped[str] = mapped_column(String(16), index=True)
    outcome: Mapped[str | None] = mapped_column(String(16))  # the status `ending` leads to
    paid_hours: Mapped[float] = mapped_column(Float, default=0.0)
    amount: Mapped[int] = mapped_column(BigInteger, default=0)  # all payments received for it
    paid_until: Mapped[datetime | None]  # wall-clock end of the paid time (set when it starts)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # launches tried (names differ)
    tried_regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    checkpoint_url: Mapped[str | None] = mapped_column(String(500))
    checkpoint_progress: Mapped[float | None] = mapped_column(Float)
    last_progress: Mapped[float | None] = mapped_column(Float)  # last PROCURE_PROGRESS line read
    log_cursor: Mapped[int] = mapped_column(Integer, default=0)
    logs: Mapped[list[str]] = mapped_column(JSON, default=list)  # the last lines, bounded
    logs_total: Mapped[int] = mapped_column(Integer, default=0)  # lines ever: where `logs` ends
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class GatewayPaymentRow(Base):
    """A payment received (settled to the gateway's address): a job's submit or a renewal."""

    __tablename__ = "gateway_payments"

    nonce: Mapped[str] = mapped_column(String(80), primary_key=True)  # refused when seen again
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # submit | renew
    key: Mapped[str] = mapped_column(String(200))  # the request's Idempotency-Key
    payer: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    hours: Mapped[float] = mapped_column(Float)
    transaction: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(12))  # pending (settling) | completed
    created_at: Mapped[datetime]


class GatewayInstanceRow(Base):
    """An instance for a job, written (`launching`) before the cloud is called: its name is the
    idempotency key, so after a crash the gateway finds it by name and never launches again."""

    __tablename__ = "gateway_instances"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    provider: Mapped[str] = mapped_column(String(16))
    region: Mapped[str] = mapped_column(String(100))
    offer: Mapped[dict[str, Any]]
    price_per_hour: Mapped[int] = mapped_column(BigInteger)
    instance_id: Mapped[str | None] = mapped_column(String(100))
    # launching | booting | running | terminated | failed (never launched)
    status: Mapped[str] = mapped_column(String(16), index=True)
    node_url: Mapped[str | None] = mapped_column(String(500))
    node_job_id: Mapped[str | None] = mapped_column(String(100))
    launched_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    cost: Mapped[int | None] = mapped_column(BigInteger)  # billed (or computed) at the end
    created_at: Mapped[datetime]


class GatewayLeaseRow(Base):
    """Which gateway this store's book belongs to (one row, `name` "gateway"): the gateway
    (vendor id, cloud and wallet, as `identity`) whose processes renew `expires_at` while they
    run. Another gateway may take the store only once that lease has lapsed and the book holds
    nothing of the first's unfinished (`procure.gateway.storelease`). Released (`expires_at`
    NULL) on a clean stop, the row and its gateway stay: the book is still that gateway's."""

    __tablename__ = "gateway_lease"

    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    identity: Mapped[str] = mapped_column(String(64))  # digest of vendor id, cloud, wallet
    vendor_id: Mapped[str] = mapped_column(String(200))  # shown in a refusal
    provider: Mapped[str] = mapped_column(String(16))
    pay_to: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(200))  # host:pid of the last process to renew it
    expires_at: Mapped[datetime | None]
    taken_at: Mapped[datetime]
