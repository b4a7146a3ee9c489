"""The global spend ledger: optional caps on total spend per hour, day and month, across agent
payments and fleet instance-hours (invariant 1: no combination of runs and instances overspends).

Windows roll: the last 60 minutes, the last 24 hours, the last 30 days. Agent spend is the sum of
completed and pending payments created in the window (a pending one may still move money), except
a cloud instance's (nonce `cloud-…`): one payment grown as the instance runs, spread over the
time it covers, so an instance that has run for hours still counts in the last hour. Fleet spend
is each instance's price times the hours it was billed inside the window, plus, for an instance
still running, the rest of the hour it has started (Lambda bills by the minute, but an instance
launched now will run at least until the next decision, so it is counted forward), and an hour
of each launch in flight (sent, or waiting to be sent again, and not yet listed).

`global_cap_conflict` fences concurrent spenders: on PostgreSQL with a transaction-scoped advisory
lock, on SQLite by taking the one write lock before reading: two spenders that check and then
record in the same transaction are serialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import ColumnElement, Row, case, func, literal, literal_column, or_, select, text
from sqlalchemy.orm import Session

from procure.models import CLOUD_NONCE_PREFIX, format_usd, usd_to_micros
from procure.settings import CHECKED, finite_numbers
from procure.store.fleet_tables import ActionRow, FleetInstanceRow
from procure.store.tables import PaymentRow

LEDGER_LOCK = 0x70726F63  # "proc": the advisory lock key every spender takes
PROVISION = "provision_instance"  # the fleet's launch (fleet.policy.PROVISION)
WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "month": timedelta(days=30)}


@dataclass(frozen=True)
class SpendCaps:
    """Caps in micro-USD; None: no cap on that window."""

    per_hour: int | None = None
    per_day: int | None = None
    per_month: int | None = None
    warn_at: float = 0.8  # share of every budget that warns first (procure.warnings)

    def items(self) -> list[tuple[str, int]]:
        caps = {"hour": self.per_hour, "day": self.per_day, "month": self.per_month}
        return [(window, cap) for window, cap in caps.items() if cap is not None]

    @property
    def any(self) -> bool:
        return bool(self.items())


class SpendCapSettings(BaseSettings):
    model_config = SettingsConfigDict(**CHECKED)

    max_spend_per_hour: float | None = Field(
        None, ge=0, le=1e9, validation_alias="PROCURE_MAX_SPEND_PER_HOUR"
    )
    max_spend_per_day: float | None = Field(
        None, ge=0, le=1e9, validation_alias="PROCURE_MAX_SPEND_PER_DAY"
    )
    max_spend_per_month: float | None = Field(
        None, ge=0, le=1e9, validation_alias="PROCURE_MAX_SPEND_PER_MONTH"
    )
    warning_threshold: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, validation_alias="PROCURE_WARNING_THRESHOLD"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any, info: ValidationInfo) -> Any:
        value = None if isinstance(value, str) and not value.strip() else value
        return value if value is None else finite_numbers(cls, value, info)

    def caps(self) -> SpendCaps:
        def micros(usd: float | None) -> int | None:
            return None if usd is None else usd_to_micros(usd)

        return SpendCaps(
            micros(self.max_spend_per_hour),
            micros(self.max_spend_per_day),
            micros(self.max_spend_per_month),
            0.8 if self.warning_threshold is None else self.warning_threshold,
        )


def load_caps() -> SpendCaps:
    """The caps from the environment (PROCURE_MAX_SPEND_PER_HOUR|DAY|MONTH, in dollars)."""
    return SpendCapSettings().caps()


def fence(s: Session) -> None:
    """Serialise spenders until this transaction ends: PostgreSQL's advisory lock; on SQLite
    the write lock, taken by a write that changes nothing (reads before any write run outside
    the transaction, so a spender that read first would decide on a ledger another changes)."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LEDGER_LOCK})
    elif dialect == "sqlite":
        s.execute(text("UPDATE store_totals SET value = value WHERE 0"))


CLOUD = f"{CLOUD_NONCE_PREFIX}%"  # cloud instances' payments' nonces (`Payment.reserves_cloud`)
# How far back a cloud payment's span may start and still reach into a window: an instance
# that ran longer than this before its window is counted from where the scan starts.
CLOUD_SPAN = timedelta(days=400)
SPENT = ("completed", "pending")


def payments_spent(s: Session, since: datetime) -> int:
    return _x402_spent(s, since) + cloud_spent(s, since)


def _x402_spent(s: Session, since: datetime) -> int:
    total = s.scalar(
        select(func.coalesce(func.sum(PaymentRow.amount), 0)).where(
            PaymentRow.status.in_(SPENT),
            PaymentRow.created_at >= since,
            ~PaymentRow.nonce.like(CLOUD),
        )
    )
    return int(total or 0)


CLOUD_ROWS = literal_column(f"'{CLOUD}'")
"""The pattern as a literal, the very text of index `ix_payments_cloud_created`'s WHERE clause
(a partial index serves only a query that says the same; a bound parameter does not)."""
MARGIN = timedelta(minutes=1)
"""How much earlier than its window the database's coarse test of a row's end may look (SQLite
reads times as Julian days, to a fraction of a millisecond): the exact share is Python's."""


def _may_reach(s: Session, since: datetime) -> ColumnElement[bool]:
    """Whether a cloud payment's covered time may reach `since`: created or touched since (a
    bill booked, a reservation made), or reserved up to it (its creation plus its hours).
    Never false for a row with a share in the window (see `cloud_spent`): only the rows the
    window cannot hold are left in the database."""
    cut = since - MARGIN
    # Hours past the scan's reach say no more than the reach does, and none or fewer than none
    # cover no time (as `_cloud_share` reads them): clamped both ways, a hostile or broken row
    # (1e300 hours, or -1e300) overflows no interval or timestamp; NULL falls to the else.
    most = CLOUD_SPAN.total_seconds() / 3600
    hours = case(
        (PaymentRow.hours > most, most), (PaymentRow.hours > 0, PaymentRow.hours), else_=0.0
    )
    if s.get_bind().dialect.name == "postgresql":
        reserved = PaymentRow.created_at + func.make_interval(0, 0, 0, 0, 0, 0, hours * 3600)
        reaches = reserved >= cut
    else:
        at = literal(cut, PaymentRow.created_at.type)  # stored as the column stores times
        reaches = func.julianday(PaymentRow.created_at) + hours / 24.0 >= func.julianday(at)
    return or_(PaymentRow.created_at >= cut, PaymentRow.updated_at >= cut, reaches)


def cloud_spent(s: Session, since: datetime) -> int:
    """Cloud instances' payments, each spread evenly over the hours it covers from its creation
    (what is reserved ahead included, as a cap must count it; a booked bill, up to its booking
    at least): the share inside the window. A payment covering no time (a late launch booked
    when found) counts where it was booked."""
    return cloud_spent_since(s, [since])[0]


def cloud_spent_since(s: Session, sinces: Sequence[datetime]) -> list[int]:
    """`cloud_spent` of several windows (their starts), from one read.

    Read by `ix_payments_cloud_created` (cloud payments only; no status in the WHERE clause, or
    SQLite's planner takes the status index, every spent payment of the scan's reach), and only
    the rows that may reach the widest window come back: the cost follows the cloud payments of
    the last months, not a year of x402 payments, and the Python loop the window's rows."""
    earliest = min(sinces)
    rows = s.execute(
        select(
            PaymentRow.amount,
            PaymentRow.created_at,
            PaymentRow.hours,
            PaymentRow.status,
            PaymentRow.updated_at,
        ).where(
            PaymentRow.nonce.like(CLOUD_ROWS),
            PaymentRow.created_at >= earliest - CLOUD_SPAN,
            _may_reach(s, earliest),
        )
    ).all()
    spent = [row for row in rows if row.status in SPENT]
    return [_cloud_share(spent, since) for since in sinces]


def _cloud_share(rows: Sequence[Row[Any]], since: datetime) -> int:
    total = 0.0
    for amount, created, hours, status, booked in rows:
        if created < since - CLOUD_SPAN:  # beyond this window's reach (read for a wider one)
            continue
        span = max(0.0, hours or 0.0)
        if status == "completed":
            # A bill is booked once the instance has stopped billing, maybe long after its
            # reservation ran out (a terminate refused for a while, an instance abandoned to
            # the sweeper): spread to its booking, else the time billed past the reservation
            # would count in no window (an error high, never low).
            span = max(span, _hours(created, booked))
        if span <= 0:
            total += amount if created >= since else 0
            continue
        inside = _hours(max(created, since), created + timedelta(hours=span))
        total += amount * min(1.0, inside / span)
    return round(total)


def _hours(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() / 3600)


def launches_in_flight(s: Session, but: str | None = None) -> int:
    """Micro-USD per hour of the fleet's launches in flight, other than action `but`: sent (or
    waiting to be sent again) and not yet listed as an instance. Each will bill like one."""
    flying = s.execute(
        select(ActionRow.action_id, ActionRow.price_per_hour)
        .where(ActionRow.status == "executing", ActionRow.action_type == PROVISION)
        .limit(1000)
    ).all()
    ids = [a for a, _ in flying if a != but]
    if not ids:
        return 0
    landed = set(
        s.scalars(select(FleetInstanceRow.launched_by).where(FleetInstanceRow.launched_by.in_(ids)))
    )
    return sum(price for a, price in flying if a in ids and a not in landed)


def fleet_spent(
    s: Session, since: datetime, now: datetime, *, forward: bool = True, but: str | None = None
) -> int:
    """Instance-hours times price inside [since, now], plus (`forward`) the started hour of the
    running ones and an hour of each launch in flight other than action `but` (what a cap must
    count; a cost report counts only what has accrued)."""
    rows = s.execute(
        select(
            FleetInstanceRow.price_per_hour,
            FleetInstanceRow.first_seen_at,
            FleetInstanceRow.ended_at,
        ).where(or_(FleetInstanceRow.ended_at.is_(None), FleetInstanceRow.ended_at >= since))
    ).all()
    total = 0.0
    for price, seen, ended in rows:
        # First seen after `now`: stamped by a clock ahead of this one (the controller's host),
        # not a future instance: it bills now, so it counts from now (skipped, it counted $0).
        first_seen = min(seen, now)
        start = max(first_seen, since)
        if ended is None:
            billed = _hours(first_seen, now)
            rest = 1.0 - billed % 1.0 if forward else 0.0  # the rest of the hour it is in
            total += price * (_hours(start, now) + rest)
        else:
            total += price * _hours(start, min(ended, now))
    return round(total) + (launches_in_flight(s, but) if forward else 0)


def spent(s: Session, window: str, *, now: datetime, but: str | None = None) -> int:
    """What the window holds, as the caps count it (`but`: a launch being checked again, which
    its own amount already counts)."""
    return spent_in(s, [window], now=now, but=but)[window]


def spent_in(
    s: Session, windows: Sequence[str], *, now: datetime, but: str | None = None
) -> dict[str, int]:
    """`spent` of each window, the cloud payments of all of them read once."""
    sinces = [now - WINDOWS[window] for window in windows]
    cloud = cloud_spent_since(s, sinces) if sinces else []
    return {
        window: _x402_spent(s, since) + cloud[i] + fleet_spent(s, since, now, but=but)
        for i, (window, since) in enumerate(zip(windows, sinces, strict=True))
    }


def global_cap_conflict(
    s: Session, caps: SpendCaps, amount_micros: int, *, now: datetime, but: str | None = None
) -> str | None:
    """Why spending `amount_micros` more now would break a global cap, or None if it would not.
    Fences the transaction first, so the caller records its spend before anyone else checks.
    `but`: the fleet's launch whose hour `amount_micros` is, if it is already in flight."""
    if not caps.any:
        return None
    fence(s)
    windows = caps.items()
    held = spent_in(s, [window for window, _cap in windows], now=now, but=but)
    for window, cap in windows:
        already = held[window]
        if already + amount_micros > cap:
            return (
                f"global spend cap per {window} ({format_usd(cap)}) would be exceeded: "
                f"{format_usd(already)} spent + {format_usd(amount_micros)}"
            )
    return None
