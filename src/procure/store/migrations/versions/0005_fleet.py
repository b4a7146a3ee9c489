"""the fleet controller: autonomous actions (seed 004's schema and indexes, plus rollback and
approval data), instance-hours, node samples, the outbox and the controller lease

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "autonomous_actions",
        sa.Column("action_id", sa.String(255), primary_key=True),
        sa.Column("action_type", sa.String(50), nullable=False),
        sa.Column("target_instance", sa.String(255)),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("cost_impact", sa.Numeric(10, 2)),
        sa.Column("status", sa.String(50), nullable=False),
        sa.Column("metrics_before", sa.JSON()),
        sa.Column("metrics_after", sa.JSON()),
        sa.Column("created_at", TS),
        sa.Column("executed_at", TS),
        sa.Column("error_message", sa.Text()),
        sa.Column("dry_run", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("instance_type", sa.String(100)),
        sa.Column("region", sa.String(100)),
        sa.Column("price_per_hour", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("block_reason", sa.String(50)),
        sa.Column("needed_approval", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("expires_at", TS),
        sa.Column("decided_by", sa.String(200)),
        sa.Column("decided_at", TS),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS),
        sa.Column("rollback_data", sa.JSON()),
        sa.Column("rollback_of", sa.String(255)),
        sa.Column("updated_at", TS),
    )
    op.create_index("idx_actions_created", "autonomous_actions", ["created_at"])
    op.create_index("idx_actions_type", "autonomous_actions", ["action_type"])
    op.create_index("idx_actions_status", "autonomous_actions", ["status"])

    op.create_table(
        "fleet_instances",
        sa.Column("instance_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(255)),
        sa.Column("instance_type", sa.String(100), nullable=False),
        sa.Column("region", sa.String(100), nullable=False),
        sa.Column("ip", sa.String(100)),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("price_per_hour", sa.BigInteger(), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("launched_by", sa.String(255)),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.Column("ended_at", TS),
    )
    op.create_index("ix_fleet_instances_name", "fleet_instances", ["name"])
    op.create_index("ix_fleet_instances_ended_at", "fleet_instances", ["ended_at"])

    op.create_table(
        "fleet_samples",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.String(255), nullable=False),
        sa.Column("taken_at", TS, nullable=False),
        sa.Column("reachable", sa.Boolean(), nullable=False),
        sa.Column("gpu_util", sa.Float()),
        sa.Column("memory_used_mb", sa.BigInteger()),
        sa.Column("temperature_c", sa.Float()),
        sa.Column("power_w", sa.Float()),
        sa.Column("xid_errors", sa.Integer()),
        sa.Column("gpus_failing", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error", sa.String(300)),
    )
    op.create_index("ix_fleet_samples_instance", "fleet_samples", ["instance_id", "taken_at"])

    op.create_table(
        "fleet_outbox",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("delivered_at", TS),
        sa.Column("last_error", sa.String(300)),
    )
    op.create_index(
        "ix_fleet_outbox_due", "fleet_outbox", ["channel", "delivered_at", "next_attempt_at"]
    )

    op.create_table(
        "fleet_lease",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("owner", sa.String(200)),
        sa.Column("expires_at", TS),
        sa.Column("last_scan_at", TS),
        sa.Column("last_error", sa.String(500)),
        sa.Column("backoff_until", TS),
    )


def downgrade() -> None:
    op.drop_table("fleet_lease")
    op.drop_index("ix_fleet_outbox_due", "fleet_outbox")
    op.drop_table("fleet_outbox")
    op.drop_index("ix_fleet_samples_instance", "fleet_samples")
    op.drop_table("fleet_samples")
    op.drop_index("ix_fleet_instances_ended_at", "fleet_instances")
    op.drop_index("ix_fleet_instances_name", "fleet_instances")
    op.drop_table("fleet_instances")
    for name in ("idx_actions_status", "idx_actions_type", "idx_actions_created"):
        op.drop_index(name, "autonomous_actions")
    op.drop_table("autonomous_actions")
