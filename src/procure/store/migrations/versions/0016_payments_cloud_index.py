"""payments: a partial index over cloud instances' payments (nonce `cloud-…`) by creation time,
so that the spend ledger's cap check (`ledger.cloud_spent`, taken under the ledger's lock before
every payment when global caps are set) reads the cloud payments that may reach into its window,
not every payment of the last 400 days

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
# 0015: the newest migration when this one was written. Another change may bring a 0016; this
# one then follows it (one head), whichever lands first.
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as the ledger's query has (a literal, not a parameter): both SQLite and
# PostgreSQL use a partial index only for a query whose WHERE clause implies the index's.
CLOUD_ROWS = "nonce LIKE 'cloud-%'"


def upgrade() -> None:
    op.create_index(
        "ix_payments_cloud_created",
        "payments",
        ["created_at"],
        sqlite_where=sa.text(CLOUD_ROWS),
        postgresql_where=sa.text(CLOUD_ROWS),
    )


def downgrade() -> None:
    op.drop_index("ix_payments_cloud_created", table_name="payments")
