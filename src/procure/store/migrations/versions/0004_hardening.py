"""cancellation, bounded progress and history, per-vendor credentials

Runs keep a user's request to cancel (when, by whom, why), how many ticks in a row found no way
forward (a run that cannot progress ends after a bounded number of them), and how many vendor log
lines were kept (a run keeps a bounded number); jobs keep when they last made progress (a job
that stalls is given up). Vendors keep their own credential, encrypted.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "runs", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("runs", sa.Column("cancel_reason", sa.Text(), nullable=True))
    op.add_column("runs", sa.Column("troubles", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("runs", sa.Column("log_lines", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("vendors", sa.Column("credential", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("progressed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("progressed_at")
    with op.batch_alter_table("vendors") as batch:
        batch.drop_column("credential")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("log_lines")
        batch.drop_column("troubles")
        batch.drop_column("cancel_reason")
        batch.drop_column("cancel_requested_at")
