"""The agent's cloud instances (one per job run on a rented instance: its name, the intent before
launch, the node, the money reserved and billed) and what procure learned of each cloud offer
kind (provider, region, GPU): outcomes, preemptions, boot times, cool-downs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from procure.store.tables import Base


class CloudInstanceRow(Base):
    """Written (status `launching`) in the transaction that writes its job's intent, before the
    cloud is called; the name is the job's idempotency key behind procure's label, so a crash
    anywhere is followed by `find(name)`, never by a second launch."""

    __tablename__ = "cloud_instances"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    vendor_id: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(16))
    offer: Mapped[dict[str, Any]]
    instance_id: Mapped[str | None] = mapped_column(String(100))
    # launching | booting | running | terminating | terminated
    status: Mapped[str] = mapped_column(String(16), index=True)
    node_url: Mapped[str | None] = mapped_column(String(500))
    node_token: Mapped[str] = mapped_column(Text)  # encrypted (vendors.credentials.Keyring)
    node_job_id: Mapped[str | None] = mapped_column(String(100))
    boot_deadline: Mapped[datetime | None]
    launched_at: Mapped[datetime | None]  # just before the launch call
    # While it boots, the last poll that saw it booting; then kept: when its bill may start.
    active_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]  # when the provider accepted its terminate
    # Money: reserved (the job's pending payment) through `reserved_until`; billed at the end.
    reserved_until: Mapped[datetime | None]
    billed: Mapped[int | None] = mapped_column(BigInteger)
    # Why it ends (set with `terminating`), and the job's fate once it has: completed | failed |
    # job_failed (the user's job failed on its node) | cancelled | stopped; `fault`: the
    # provider's fault (counted against its offer kind).
    outcome: Mapped[str | None] = mapped_column(String(16))
    end_reason: Mapped[str | None] = mapped_column(Text)
    fault: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class CloudStatsRow(Base):
    """What procure learned of renting one GPU model in one region of one provider."""

    __tablename__ = "cloud_stats"

    provider: Mapped[str] = mapped_column(String(16), primary_key=True)
    region: Mapped[str] = mapped_column(String(100), primary_key=True)
    gpu: Mapped[str] = mapped_column(String(32), primary_key=True)
    successes: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    preemptions: Mapped[int] = mapped_column(Integer, default=0)
    gpu_hours: Mapped[float] = mapped_column(Float, default=0.0)
    boots: Mapped[int] = mapped_column(Integer, default=0)
    boot_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cooldown_until: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class MetaRow(Base):
    """Facts about this store itself: `install_id`, a random tag made when the store was created
    (migration 0011), in the names of the agent's cloud instances."""

    __tablename__ = "procure_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
