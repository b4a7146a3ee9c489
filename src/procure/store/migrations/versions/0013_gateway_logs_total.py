"""gateway logs total: how many log lines a sold job has had, so that `GET /job-status`, which
shows only the last ones, can say where they start (`logsOffset`) and a buyer misses none.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "gateway_jobs",
        sa.Column("logs_total", sa.Integer(), nullable=False, server_default="0"),
    )
    # Jobs already under way count the lines they show: a buyer's cursor is already past them.
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE gateway_jobs SET logs_total = json_array_length(logs::json)")
    else:
        op.execute("UPDATE gateway_jobs SET logs_total = json_array_length(logs)")


def downgrade() -> None:
    with op.batch_alter_table("gateway_jobs") as batch:
        batch.drop_column("logs_total")
