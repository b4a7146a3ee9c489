"""payments: two partial indexes over cloud instances' payments (nonce `cloud-…`), so that the
spend cap check (`ledger.cloud_spent_since`) finds the payments made before a window that may
reach into it near the window's start, not by walking 400 days of them: by booking time (a bill
spread up to its booking), and by creation time for the rare ones of more than 24 hours

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
# 0018: the newest migration when this one was written. Another change may bring a 0019; this
# one then follows it (one head), whichever lands first.
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as the ledger's queries have (literals, not parameters): both SQLite and
# PostgreSQL use a partial index only for a query whose WHERE clause implies the index's.
# Booked after its creation: a bill whose booking may stretch its span (no other row's does);
# by booking, then creation, so the read of those made before a window (and booked in it) tests
# the creation in the index, not in each row booked since.
BOOKED_ROWS = "nonce LIKE 'cloud-%' AND updated_at > created_at"
LONG_ROWS = "nonce LIKE 'cloud-%' AND hours > 24"


def upgrade() -> None:
    op.create_index(
        "ix_payments_cloud_booked",
        "payments",
        ["updated_at", "created_at"],
        sqlite_where=sa.text(BOOKED_ROWS),
        postgresql_where=sa.text(BOOKED_ROWS),
    )
    op.create_index(
        "ix_payments_cloud_long",
        "payments",
        ["created_at"],
        sqlite_where=sa.text(LONG_ROWS),
        postgresql_where=sa.text(LONG_ROWS),
    )


def downgrade() -> None:
    op.drop_index("ix_payments_cloud_long", table_name="payments")
    op.drop_index("ix_payments_cloud_booked", table_name="payments")
