"""fleet_instances: the node's address the fleet checked to be the instance's own (its IP and the
fleet's node port, or on RunPod and Vast.ai the port the cloud maps, on the instance's own IP),
so that the dashboard sends the node token there only, never to a shared host's other port

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
# 0019: the newest migration when this one was written. Another change may bring a 0020; this
# one then follows it (one head), whichever lands first.
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows from before know no checked address (NULL): the Nodes page does not ask their node
    # until the controller's next scan records one.
    op.add_column("fleet_instances", sa.Column("node_url", sa.String(300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fleet_instances") as batch:
        batch.drop_column("node_url")
