"""The store's interface to the dashboard's logged-out sessions: plain functions over a Session.
Rows live as long as their session could (issued within the max age) and are purged after."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from procure.store.tables import RevokedSessionRow

MAX_ROWS = 10_000
"""At most this many live revocations: one per logout of a logged-in session, which only a
holder of the token can make; far more than any operator logs out within a session's max age."""


def revoke(s: Session, sid: str, issued_at: datetime, *, issued_after: datetime) -> bool:
    """Keep `sid` revoked; first purge the sessions issued before `issued_after` (expired by
    now). False (nothing written) when MAX_ROWS live revocations are kept already."""
    s.execute(delete(RevokedSessionRow).where(RevokedSessionRow.issued_at < issued_after))
    if s.scalar(select(func.count()).select_from(RevokedSessionRow)) >= MAX_ROWS:
        return False
    values = {"sid": sid, "issued_at": issued_at}
    # A double click logs out twice: the second insert finds the row and leaves it.
    insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    s.execute(insert(RevokedSessionRow).values(values).on_conflict_do_nothing())
    return True


def revoked(s: Session, *, issued_after: datetime) -> dict[str, datetime]:
    """The live revocations (sessions issued after `issued_after`): sid -> issued at."""
    rows = s.execute(
        select(RevokedSessionRow.sid, RevokedSessionRow.issued_at)
        .where(RevokedSessionRow.issued_at >= issued_after)
        .limit(MAX_ROWS)
    )
    return {sid: issued for sid, issued in rows}
