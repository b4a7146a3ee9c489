"""The gateway's book: quotes, sold jobs, payments received and the instances launched for them.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "gateway_quotes",
        sa.Column("quote_id", sa.String(32), primary_key=True),
        sa.Column("gpu", sa.String(32), nullable=False),
        sa.Column("hours", sa.Float(), nullable=False),
        sa.Column("price_per_hour", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("cost_per_hour", sa.BigInteger(), nullable=False),
        sa.Column("offer", sa.JSON(), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_gateway_quotes_expires_at", "gateway_quotes", ["expires_at"])
    op.create_table(
        "gateway_jobs",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(200), nullable=False, unique=True),
        sa.Column("quote_id", sa.String(32), nullable=False),
        sa.Column("gpu", sa.String(32), nullable=False),
        sa.Column("payer", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(80), nullable=False, unique=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("resume_from", sa.String(500)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16)),
        sa.Column("paid_hours", sa.Float(), nullable=False, server_default="0"),
        sa.Column("amount", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("paid_until", TS),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("tried_regions", sa.JSON(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
        sa.Column("checkpoint_url", sa.String(500)),
        sa.Column("checkpoint_progress", sa.Float()),
        sa.Column("last_progress", sa.Float()),
        sa.Column("log_cursor", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("logs", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("cancel_requested", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("ended_at", TS),
    )
    op.create_index("ix_gateway_jobs_status", "gateway_jobs", ["status"])
    op.create_index("ix_gateway_jobs_payer", "gateway_jobs", ["payer"])
    op.create_table(
        "gateway_payments",
        sa.Column("nonce", sa.String(80), primary_key=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("payer", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("hours", sa.Float(), nullable=False),
        sa.Column("transaction", sa.String(200)),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_gateway_payments_job_id", "gateway_payments", ["job_id"])
    op.create_table(
        "gateway_instances",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("region", sa.String(100), nullable=False),
        sa.Column("offer", sa.JSON(), nullable=False),
        sa.Column("price_per_hour", sa.BigInteger(), nullable=False),
        sa.Column("instance_id", sa.String(100)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("node_url", sa.String(500)),
        sa.Column("node_job_id", sa.String(100)),
        sa.Column("launched_at", TS),
        sa.Column("ended_at", TS),
        sa.Column("cost", sa.BigInteger()),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_gateway_instances_job_id", "gateway_instances", ["job_id"])
    op.create_index("ix_gateway_instances_status", "gateway_instances", ["status"])


def downgrade() -> None:
    op.drop_table("gateway_instances")
    op.drop_table("gateway_payments")
    op.drop_table("gateway_jobs")
    op.drop_table("gateway_quotes")
