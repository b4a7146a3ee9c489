"""scale: indexes for every hot or periodic query, and running totals (runs by status, payments
by status and amount) kept by triggers in the writer's own transaction, backfilled from the rows

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# (name, table, columns): each serves a hot or periodic query (tests/test_scale_plans.py).
INDEXES = [
    ("ix_runs_created", "runs", ["created_at", "id"]),
    ("ix_runs_status_created", "runs", ["status", "created_at", "id"]),
    ("ix_observations_run_id_id", "observations", ["run_id", "id"]),
    ("ix_tick_log_finished", "tick_log", ["finished_at"]),
    ("ix_payments_status_created", "payments", ["status", "created_at", "id"]),
    ("ix_payments_created", "payments", ["created_at", "id"]),
    ("ix_actions_created_id", "autonomous_actions", ["created_at", "action_id"]),
    ("ix_fleet_samples_taken", "fleet_samples", ["taken_at"]),
    ("ix_fleet_outbox_delivered", "fleet_outbox", ["delivered_at"]),
]

# One row per change, summed on read and folded now and then (procure.store.totals.fold):
# writers only ever insert, so concurrent writers never wait on (or deadlock over) a counter row.
SQLITE_TRIGGERS = [
    """CREATE TRIGGER totals_runs_insert AFTER INSERT ON runs BEGIN
        INSERT INTO store_totals (name, value) VALUES ('runs:' || NEW.status, 1); END""",
    """CREATE TRIGGER totals_runs_status AFTER UPDATE OF status ON runs
        WHEN NEW.status IS NOT OLD.status BEGIN
        INSERT INTO store_totals (name, value)
        VALUES ('runs:' || OLD.status, -1), ('runs:' || NEW.status, 1); END""",
    """CREATE TRIGGER totals_runs_delete AFTER DELETE ON runs BEGIN
        INSERT INTO store_totals (name, value) VALUES ('runs:' || OLD.status, -1); END""",
    """CREATE TRIGGER totals_payments_insert AFTER INSERT ON payments BEGIN
        INSERT INTO store_totals (name, value) VALUES
        ('payments:' || NEW.status, 1), ('micros:' || NEW.status, NEW.amount); END""",
    """CREATE TRIGGER totals_payments_update AFTER UPDATE OF status, amount ON payments
        WHEN NEW.status IS NOT OLD.status OR NEW.amount IS NOT OLD.amount BEGIN
        INSERT INTO store_totals (name, value) VALUES
        ('payments:' || OLD.status, -1), ('micros:' || OLD.status, -OLD.amount),
        ('payments:' || NEW.status, 1), ('micros:' || NEW.status, NEW.amount); END""",
    """CREATE TRIGGER totals_payments_delete AFTER DELETE ON payments BEGIN
        INSERT INTO store_totals (name, value) VALUES
        ('payments:' || OLD.status, -1), ('micros:' || OLD.status, -OLD.amount); END""",
]

POSTGRES_TRIGGERS = [
    """CREATE FUNCTION procure_totals_runs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            INSERT INTO store_totals (name, value) VALUES ('runs:' || OLD.status, -1);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            INSERT INTO store_totals (name, value) VALUES ('runs:' || NEW.status, 1);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER totals_runs AFTER INSERT OR DELETE ON runs
        FOR EACH ROW EXECUTE FUNCTION procure_totals_runs()""",
    """CREATE TRIGGER totals_runs_status AFTER UPDATE OF status ON runs FOR EACH ROW
        WHEN (NEW.status IS DISTINCT FROM OLD.status) EXECUTE FUNCTION procure_totals_runs()""",
    """CREATE FUNCTION procure_totals_payments() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP IN ('UPDATE', 'DELETE') THEN
            INSERT INTO store_totals (name, value) VALUES
            ('payments:' || OLD.status, -1), ('micros:' || OLD.status, -OLD.amount);
        END IF;
        IF TG_OP IN ('UPDATE', 'INSERT') THEN
            INSERT INTO store_totals (name, value) VALUES
            ('payments:' || NEW.status, 1), ('micros:' || NEW.status, NEW.amount);
        END IF;
        RETURN NULL;
    END $$""",
    """CREATE TRIGGER totals_payments AFTER INSERT OR DELETE ON payments
        FOR EACH ROW EXECUTE FUNCTION procure_totals_payments()""",
    """CREATE TRIGGER totals_payments_update AFTER UPDATE OF status, amount ON payments
        FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
        OR NEW.amount IS DISTINCT FROM OLD.amount)
        EXECUTE FUNCTION procure_totals_payments()""",
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    # (run_id, id) serves all that the single-column index did, at one index's write cost.
    op.drop_index("ix_observations_run_id", "observations")

    op.create_table(
        "store_totals",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_store_totals_name", "store_totals", ["name"])
    # The store may already hold a year of runs: the totals start from what is there. The
    # triggers are created in the same transaction, so no write falls between the two.
    op.execute(
        "INSERT INTO store_totals (name, value) "
        "SELECT 'runs:' || status, COUNT(*) FROM runs GROUP BY status"
    )
    op.execute(
        "INSERT INTO store_totals (name, value) "
        "SELECT 'payments:' || status, COUNT(*) FROM payments GROUP BY status"
    )
    op.execute(
        "INSERT INTO store_totals (name, value) "
        "SELECT 'micros:' || status, SUM(amount) FROM payments GROUP BY status"
    )
    dialect = op.get_bind().dialect.name
    for statement in POSTGRES_TRIGGERS if dialect == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS totals_payments_update ON payments")
        op.execute("DROP TRIGGER IF EXISTS totals_payments ON payments")
        op.execute("DROP TRIGGER IF EXISTS totals_runs_status ON runs")
        op.execute("DROP TRIGGER IF EXISTS totals_runs ON runs")
        op.execute("DROP FUNCTION IF EXISTS procure_totals_payments()")
        op.execute("DROP FUNCTION IF EXISTS procure_totals_runs()")
    else:
        for name in ("runs_insert", "runs_status", "runs_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS totals_{name}")
        for name in ("payments_insert", "payments_update", "payments_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS totals_{name}")
    op.drop_index("ix_store_totals_name", "store_totals")
    op.drop_table("store_totals")
    op.create_index("ix_observations_run_id", "observations", ["run_id"])
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table)
