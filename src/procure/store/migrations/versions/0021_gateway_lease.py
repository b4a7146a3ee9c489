"""gateway_lease: which gateway (vendor id, cloud, wallet) a store's gateway book belongs to and
whether it runs, so that a second gateway started on the store is refused instead of advancing
the first's jobs on its own cloud and dropping the payments made to the first's address

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
# 0020: the newest migration when this one was written. Another change may bring a 0021; this
# one then follows it (one head), whichever lands first.
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # No row on the upgrade: the first gateway to start takes the store and its book, as a
    # gateway did before.
    op.create_table(
        "gateway_lease",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("identity", sa.String(64), nullable=False),
        sa.Column("vendor_id", sa.String(200), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("pay_to", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("expires_at", TS),
        sa.Column("taken_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gateway_lease")
