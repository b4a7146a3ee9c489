"""Keyset pagination over the lists that grow (runs, payments, fleet actions): each page is one
index range scan from an opaque cursor (the last row's sort key), never an OFFSET scan, so the
ten-thousandth page costs what the first does."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from procure.store.fleet_tables import ActionRow
from procure.store.tables import Base, PaymentRow, RunRow

R = TypeVar("R", bound=Base)


class BadCursor(ValueError):
    """A cursor this store did not hand out (or one altered on the way)."""


@dataclass(frozen=True)
class Key:
    """Where a page starts: the sort key (creation time, id) of the row before it."""

    at: datetime
    id: str

    def encode(self) -> str:
        raw = json.dumps([self.at.isoformat(), self.id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> Key:
    """The key of a cursor from `Key.encode`; BadCursor for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, id_ = json.loads(raw)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:  # astimezone would take it as the server's local time
            raise ValueError("a naive time")
        # Turned to UTC here, as the store's bind would: a time valid in its own zone may
        # leave the datetime range in UTC (year 9999 west of it), a 400 and not a 500 later.
        when = when.astimezone(UTC)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
        raise BadCursor("not a cursor this server handed out") from exc
    if not isinstance(id_, str) or len(id_) > 255:
        raise BadCursor("not a cursor this server handed out")
    return Key(when, id_)


@dataclass(frozen=True)
class Page(Generic[R]):
    rows: list[R]
    next: Key | None  # the cursor of the next page in the same direction; None: last page


def _page(
    s: Session,
    query: Select[tuple[R]],
    at: InstrumentedAttribute[Any],
    id_: InstrumentedAttribute[Any],
    *,
    limit: int,
    after: Key | None,
    newest_first: bool,
) -> Page[R]:
    if after is not None:
        key = tuple_(at, id_)
        bound = (after.at, after.id)
        where: ColumnElement[bool] = key < bound if newest_first else key > bound
        query = query.where(where)
    order = (at.desc(), id_.desc()) if newest_first else (at.asc(), id_.asc())
    rows = list(s.scalars(query.order_by(*order).limit(limit + 1)))
    if len(rows) <= limit:
        return Page(rows, None)
    del rows[limit:]
    last = rows[-1]
    return Page(rows, Key(getattr(last, at.key), getattr(last, id_.key)))


def runs(
    s: Session,
    *,
    limit: int,
    after: Key | None = None,
    status: str | None = None,
    newest_first: bool = True,
) -> Page[RunRow]:
    """Runs by creation time (newest first by default), `limit` after the cursor `after`."""
    query = select(RunRow)
    if status:
        query = query.where(RunRow.status == status)
    return _page(
        s,
        query,
        RunRow.created_at,
        RunRow.id,
        limit=limit,
        after=after,
        newest_first=newest_first,
    )


def payments(
    s: Session,
    *,
    limit: int,
    after: Key | None = None,
    status: str | None = None,
    run_id: str | None = None,
) -> Page[PaymentRow]:
    """Payments newest first, optionally of one status and/or one run."""
    query = select(PaymentRow)
    if status:
        query = query.where(PaymentRow.status == status)
    if run_id:
        query = query.where(PaymentRow.run_id == run_id)
    return _page(
        s,
        query,
        PaymentRow.created_at,
        PaymentRow.id,
        limit=limit,
        after=after,
        newest_first=True,
    )


def actions(
    s: Session, *, limit: int, after: Key | None = None, status: str | Sequence[str] | None = None
) -> Page[ActionRow]:
    """Fleet actions newest first (the audit trail), optionally of some statuses."""
    query = select(ActionRow)
    if isinstance(status, str):
        query = query.where(ActionRow.status == status)
    elif status is not None:
        query = query.where(ActionRow.status.in_(list(status)))
    return _page(
        s,
        query,
        ActionRow.created_at,
        ActionRow.action_id,
        limit=limit,
        after=after,
        newest_first=True,
    )
