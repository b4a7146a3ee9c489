"""fleet clock offset: how far the fleet controller's clock was from the wall clock at its last
scan, so that an approval is judged on the controller's clock (a simulated one may run months
behind) without taking a stopped controller's old scan for a clock far behind.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("fleet_lease", sa.Column("clock_offset_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fleet_lease") as batch:
        batch.drop_column("clock_offset_s")
