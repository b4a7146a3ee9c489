"""fleet_outbox: an index by channel and age, for the kept instances' announcements each fleet
scan reads (`fleet.kept`: the audit rows of the last 7 days, not every row of the week);
fleet_lease: whether its holder is a dry run, which a live controller takes the lease from

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_fleet_outbox_channel_created", "fleet_outbox", ["channel", "created_at"])
    # A lease held now was taken by a controller of the code before: counted live (as it
    # was), so nothing running changes hands on the upgrade.
    op.add_column(
        "fleet_lease",
        sa.Column("dry_run", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("fleet_lease") as batch:
        batch.drop_column("dry_run")
    op.drop_index("ix_fleet_outbox_channel_created", table_name="fleet_outbox")
