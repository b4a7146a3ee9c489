"""budget warnings: one row per budget crossing its warning threshold (a run's budget, a global
ledger window per period, a fleet cap per hour), unique so each crossing is recorded once.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "budget_warnings",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("budget", sa.String(64), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("cap", sa.BigInteger(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("scope", "budget", "period", name="uq_budget_warnings_once"),
    )
    op.create_index("ix_budget_warnings_created", "budget_warnings", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_budget_warnings_created", table_name="budget_warnings")
    op.drop_table("budget_warnings")
