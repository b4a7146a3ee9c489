"""install id: a random tag made once per store, in the names of the agent's cloud instances, so
that two procure installs on one cloud account never sweep each other's instances.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    meta = op.create_table(
        "procure_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(200), nullable=False),
    )
    op.bulk_insert(meta, [{"key": "install_id", "value": secrets.token_hex(4)}])


def downgrade() -> None:
    op.drop_table("procure_meta")
