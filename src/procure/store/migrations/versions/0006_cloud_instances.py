"""Clouds as vendors of the agent: vendors' kind and cloud terms, the agent's cloud instances,
and what procure learned per (provider, region, GPU).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("vendors") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="x402"))
        batch.add_column(sa.Column("cloud", sa.JSON()))
    op.create_table(
        "cloud_instances",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False, unique=True),
        sa.Column("vendor_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("offer", sa.JSON(), nullable=False),
        sa.Column("instance_id", sa.String(100)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("node_url", sa.String(500)),
        sa.Column("node_token", sa.Text(), nullable=False),
        sa.Column("node_job_id", sa.String(100)),
        sa.Column("boot_deadline", TS),
        sa.Column("launched_at", TS),
        sa.Column("active_at", TS),
        sa.Column("ended_at", TS),
        sa.Column("reserved_until", TS),
        sa.Column("billed", sa.BigInteger()),
        sa.Column("outcome", sa.String(16)),
        sa.Column("end_reason", sa.Text()),
        sa.Column("fault", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_cloud_instances_run_id", "cloud_instances", ["run_id"])
    op.create_index("ix_cloud_instances_status", "cloud_instances", ["status"])
    op.create_table(
        "cloud_stats",
        sa.Column("provider", sa.String(16), primary_key=True),
        sa.Column("region", sa.String(100), primary_key=True),
        sa.Column("gpu", sa.String(32), primary_key=True),
        sa.Column("successes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failures", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("preemptions", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("gpu_hours", sa.Float(), nullable=False, server_default="0"),
        sa.Column("boots", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("boot_seconds", sa.Float(), nullable=False, server_default="0"),
        sa.Column("cooldown_until", TS),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cloud_stats")
    op.drop_table("cloud_instances")
    with op.batch_alter_table("vendors") as batch:
        batch.drop_column("cloud")
        batch.drop_column("kind")
