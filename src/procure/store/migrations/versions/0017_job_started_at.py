"""jobs: when each was first seen running (`started_at`), so that the planner learns each
vendor's start-up from the time between paying for a job and its running, not from the wall
time less the work done (which reads 0 at a vendor that runs an hour of work in seconds); with a
partial index over the jobs that started, read newest first before each plan.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
# 0016: the newest migration when this one was written. Another change may bring a 0017; this
# one then follows it (one head), whichever lands first.
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same text as `repo.recent_startups` has: a partial index serves only a query whose WHERE
# clause implies the index's.
STARTED = "started_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_started",
        "jobs",
        ["started_at"],
        sqlite_where=sa.text(STARTED),
        postgresql_where=sa.text(STARTED),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_started", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("started_at")
