"""checkpoint resume, pay-as-you-go slices and deadlines

Jobs keep where they resumed from and their latest checkpoint, and the hours bought per payment;
payments keep the hours they buy; runs may carry a deadline.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("deadline", sa.DateTime(timezone=True), nullable=True))
    # server_default fills the rows that exist already; new rows get the ORM's default.
    op.add_column(
        "jobs", sa.Column("start_progress", sa.Float(), nullable=False, server_default="0")
    )
    op.add_column("jobs", sa.Column("checkpoint_url", sa.String(length=500), nullable=True))
    op.add_column(
        "jobs", sa.Column("checkpoint_progress", sa.Float(), nullable=False, server_default="0")
    )
    op.add_column("jobs", sa.Column("slice_hours", sa.Float(), nullable=True))
    op.add_column("payments", sa.Column("hours", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("hours")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("slice_hours")
        batch.drop_column("checkpoint_progress")
        batch.drop_column("checkpoint_url")
        batch.drop_column("start_progress")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("deadline")
