"""fleet samples' fleet: the name of the fleet whose controller read each node, so that whether
any node of a fleet has answered is asked of that fleet's samples only (another fleet's nodes on
the same store say nothing of a fleet running its own image).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Older samples keep no fleet (NULL): none is claimed for a fleet it may not be; they age
    # out with the samples' retention.
    op.add_column("fleet_samples", sa.Column("fleet", sa.String(100), nullable=True))
    op.create_index("ix_fleet_samples_fleet", "fleet_samples", ["fleet", "reachable"])


def downgrade() -> None:
    op.drop_index("ix_fleet_samples_fleet", table_name="fleet_samples")
    with op.batch_alter_table("fleet_samples") as batch:
        batch.drop_column("fleet")
