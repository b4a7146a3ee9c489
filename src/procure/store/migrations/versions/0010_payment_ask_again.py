"""payments.ask_again_at: when a vendor that said it is still settling a payment (503/409 with
Retry-After) may be asked about it again.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("payments", sa.Column("ask_again_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite" or sqlite3.sqlite_version_info >= (3, 35, 0):
        # Natively, not in batch mode: on SQLite batch mode copies `payments` into a new table
        # and drops its triggers (0008's running totals), so after a rollback and upgrade new
        # payments never reached the spend figures.
        op.drop_column("payments", "ask_again_at")
        return
    # An SQLite without DROP COLUMN: the batch copy, then the table's triggers as they were.
    triggers = bind.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'payments'"
    ).scalars()
    saved = [sql for sql in triggers if sql]
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("ask_again_at")
    for sql in saved:
        bind.exec_driver_sql(sql)  # as stored: not parsed again for bind parameters
