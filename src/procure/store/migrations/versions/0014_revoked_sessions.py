"""revoked sessions: dashboard logouts kept in the store, so that a copy of a logged-out
session's cookie stays refused after a restart and on every server over the same store.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revoked_sessions",
        sa.Column("sid", sa.String(32), primary_key=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    )
    # The purge deletes by issue time: without the index it would read the whole table.
    op.create_index("ix_revoked_sessions_issued_at", "revoked_sessions", ["issued_at"])


def downgrade() -> None:
    op.drop_index("ix_revoked_sessions_issued_at", table_name="revoked_sessions")
    op.drop_table("revoked_sessions")
