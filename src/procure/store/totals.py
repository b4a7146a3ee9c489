"""Running totals of the store (runs by status, payments by status, micro-USD by payment status),
read in time that does not grow with the store: triggers (migration 0008) append one row per
change in the writer's own transaction; a read sums the few rows per name, and `fold` squashes
them into one row per name now and then (the worker's periodic pass, the serverless cron, or a
read that finds too many)."""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from procure.store.tables import StoreTotalRow

FOLD_ABOVE = 2_000
"""A read folds first when the rows may exceed this (an upper bound: the id span)."""

_FOLD_POSTGRES = text(
    "WITH gone AS (DELETE FROM store_totals WHERE id <= :mark RETURNING name, value) "
    "INSERT INTO store_totals (name, value) SELECT name, SUM(value) FROM gone GROUP BY name "
    "HAVING SUM(value) <> 0"
)
_FOLD_SQLITE = (
    text(
        "INSERT INTO store_totals (name, value) "
        "SELECT name, SUM(value) FROM store_totals WHERE id <= :mark GROUP BY name "
        "HAVING SUM(value) <> 0"
    ),
    text("DELETE FROM store_totals WHERE id <= :mark"),
)


def span(s: Session) -> int:
    """At most how many rows the totals have now (two primary-key lookups)."""
    low, high = s.execute(select(func.min(StoreTotalRow.id), func.max(StoreTotalRow.id))).one()
    return 0 if low is None else int(high) - int(low) + 1


def fold(s: Session) -> int:
    """Squash the rows written so far into one per name; return the id span folded. Safe
    beside writers and other folds: each row is summed by the one fold that deletes it (on
    SQLite the single writer serialises folds; on PostgreSQL the DELETE ... RETURNING does)."""
    mark = s.scalar(select(func.max(StoreTotalRow.id)))
    if mark is None:
        return 0
    before = span(s)
    if s.get_bind().dialect.name == "postgresql":
        s.execute(_FOLD_POSTGRES, {"mark": mark})
    else:
        for statement in _FOLD_SQLITE:
            s.execute(statement, {"mark": mark})
    return before


def read(s: Session) -> dict[str, int]:
    """Every total by name (`runs:<status>`, `payments:<status>`, `micros:<status>`)."""
    rows = s.execute(
        select(StoreTotalRow.name, func.sum(StoreTotalRow.value)).group_by(StoreTotalRow.name)
    )
    return {name: int(value or 0) for name, value in rows}


def runs_by_status(s: Session) -> dict[str, int]:
    """Runs per status (statuses with none left out), as `repo.count_runs_by_status` counts."""
    return {
        name.removeprefix("runs:"): n
        for name, n in read(s).items()
        if name.startswith("runs:") and n
    }


def paid_micros(s: Session) -> int:
    """Micro-USD of completed payments."""
    return read(s).get("micros:completed", 0)
