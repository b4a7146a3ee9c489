"""The fleet controller's tables: autonomous actions (the seed's schema), instance-hours, node
samples, the notification/audit outbox and the controller lease."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from procure.store.tables import Base

# Autoincrement ids are BIGINT on PostgreSQL; SQLite only autoincrements an INTEGER key.
_BIG_ID = BigInteger().with_variant(Integer, "sqlite")


class ActionRow(Base):
    """One autonomous action, from proposal to its end (the seed's `autonomous_actions`)."""

    __tablename__ = "autonomous_actions"

    action_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    action_type: Mapped[str] = mapped_column(String(50))
    target_instance: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    cost_impact: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))  # $/h, negative: saving
    status: Mapped[str] = mapped_column(String(50))
    metrics_before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics_after: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime | None]
    executed_at: Mapped[datetime | None]
    error_message: Mapped[str | None] = mapped_column(Text)
    # Beyond the seed: how to carry it out, why it was blocked, approval and rollback.
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    instance_type: Mapped[str | None] = mapped_column(String(100))
    region: Mapped[str | None] = mapped_column(String(100))
    price_per_hour: Mapped[int] = mapped_column(BigInteger, default=0)  # micro-USD
    block_reason: Mapped[str | None] = mapped_column(String(50))
    needed_approval: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(String(200))
    decided_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    rollback_data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    rollback_of: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime | None]

    __table_args__ = (
        Index("idx_actions_created", "created_at"),
        Index("idx_actions_type", "action_type"),
        Index("idx_actions_status", "status"),
        Index("ix_actions_created_id", "created_at", "action_id"),
    )


class FleetInstanceRow(Base):
    """Every instance the controller has seen, with the span it was billed: instance-hours."""

    __tablename__ = "fleet_instances"

    instance_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255), index=True)
    instance_type: Mapped[str] = mapped_column(String(100))
    region: Mapped[str] = mapped_column(String(100))
    ip: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(32))
    price_per_hour: Mapped[int] = mapped_column(BigInteger)  # micro-USD
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    launched_by: Mapped[str | None] = mapped_column(String(255))  # action id, None: not ours
    first_seen_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    ended_at: Mapped[datetime | None] = mapped_column(index=True)
    # Where the fleet reads its node, checked to be the instance's own address (on RunPod and
    # Vast.ai, the port the cloud maps: a shared IP's other ports are other tenants'). The
    # Nodes page sends the node token there only; None: no such address (migration 0020).
    node_url: Mapped[str | None] = mapped_column(String(300))


class FleetSampleRow(Base):
    """One reading of one node (kept for `sample_retention_h`)."""

    __tablename__ = "fleet_samples"

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(String(255))
    taken_at: Mapped[datetime]
    reachable: Mapped[bool] = mapped_column(Boolean)
    gpu_util: Mapped[float | None] = mapped_column(Float)  # mean over the node's GPUs, %
    memory_used_mb: Mapped[int | None] = mapped_column(BigInteger)
    temperature_c: Mapped[float | None] = mapped_column(Float)  # hottest GPU
    power_w: Mapped[float | None] = mapped_column(Float)
    xid_errors: Mapped[int | None] = mapped_column(Integer)
    gpus_failing: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(String(300))
    # The fleet (its name) whose controller read it: whether any node of a fleet has answered
    # is asked of its own samples, never of another fleet's on the same store.
    fleet: Mapped[str | None] = mapped_column(String(100))

    __table_args__ = (
        Index("ix_fleet_samples_instance", "instance_id", "taken_at"),
        Index("ix_fleet_samples_taken", "taken_at"),
        Index("ix_fleet_samples_fleet", "fleet", "reachable"),
    )


class OutboxRow(Base):
    """A message to deliver (Slack) or an audit entry to write, delivered after its commit."""

    __tablename__ = "fleet_outbox"

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))  # slack | audit
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(300))

    __table_args__ = (
        Index("ix_fleet_outbox_due", "channel", "delivered_at", "next_attempt_at"),
        Index("ix_fleet_outbox_delivered", "delivered_at"),
        # The kept instances' announcements of the last days (`fleet.kept`, each scan): read by
        # channel and age, not every delivered row of the week (migration 0018).
        Index("ix_fleet_outbox_channel_created", "channel", "created_at"),
    )


class FleetLeaseRow(Base):
    """Who runs the fleet now (one controller acts at a time), and how its last scan went."""

    __tablename__ = "fleet_lease"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime | None]
    last_scan_at: Mapped[datetime | None]
    # The controller's clock less the wall clock at its last scan, seconds (0 for a real one; a
    # simulated clock may run months behind): expiry is judged on its clock.
    clock_offset_s: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(String(500))
    backoff_until: Mapped[datetime | None]
    # The holder only rehearses (a dry run): a live controller takes the lease from it, so a
    # dry run left running never keeps the fleet from being run (migration 0018).
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
