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
from functools import cache
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import (
    BindParameter,
    CompoundSelect,
    Row,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    text,
    union_all,
)
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
"""The pattern as a literal, the very text of the cloud indexes' WHERE clause (a partial index
serves only a query that says the same; a bound parameter does not)."""
SHORT = timedelta(hours=24)
LONG = literal_column(str(SHORT // timedelta(hours=1)))  # "24"
"""Hours past which a cloud payment is a long one (index `ix_payments_cloud_long`, migration
0019): a shorter one reaches no further than SHORT past its creation. A literal, as CLOUD_ROWS."""
MARGIN = timedelta(minutes=1)
"""How much earlier than its window a read of the rows that may reach it starts: more than the
microsecond a reservation's end may round by. Which rows count, and how much, is Python's."""


def cloud_spent(s: Session, since: datetime) -> int:
    """Cloud instances' payments, each spread evenly over the hours it covers from its creation
    (what is reserved ahead included, as a cap must count it; a booked bill, up to its booking
    at least): the share inside the window. A payment covering no time (a late launch booked
    when found) counts where it was booked."""
    return cloud_spent_since(s, [since])[0]


def cloud_spent_since(s: Session, sinces: Sequence[datetime]) -> list[int]:
    """`cloud_spent` of several windows (their starts), from two reads whose cost follows the
    windows' payments, not the history before them.

    A payment created inside a window counts in full there (its span starts inside), so that
    part is a sum in the database. Only one created before the window has a part share, and
    only the few that may reach into it come back (`_straddlers`), to be spread here. Rounded
    once, as before: the whole amounts are integers (exact in a float below 2**53), so the
    total differs from adding each share to a float in turn only where it lies within a few
    ulps of a half micro-USD."""
    if not sinces:
        return []
    whole = _cloud_whole(s, sinces)
    rows = _straddlers(s, sinces)
    return [
        round(whole[i] + _cloud_share([row for row in rows if row.created_at < since], since))
        for i, since in enumerate(sinces)
    ]


def _cloud_whole(s: Session, sinces: Sequence[datetime]) -> list[int]:
    """The spent cloud payments created in each window, summed whole, in one read of the widest
    by `ix_payments_cloud_created`."""
    params = {f"since_{i}": since for i, since in enumerate(sinces)}
    row = s.execute(_whole_read(len(sinces)), params | {"earliest": min(sinces)}).one()
    return [int(total) for total in row]


@cache
def _whole_read(windows: int) -> Select[Any]:
    """`_cloud_whole`'s statement, built once (the building, not the read, was most of its
    time). The status is summed on, not filtered on: in the WHERE clause, SQLite's planner
    takes the status index, every spent payment of the window."""
    spent = PaymentRow.status.in_(SPENT)
    since = [bindparam(f"since_{i}", type_=PaymentRow.created_at.type) for i in range(windows)]
    sums = [
        func.coalesce(
            func.sum(case((and_(PaymentRow.created_at >= at, spent), PaymentRow.amount))), 0
        )
        for at in since
    ]
    earliest = bindparam("earliest", type_=PaymentRow.created_at.type)
    return select(*sums).where(PaymentRow.nonce.like(CLOUD_ROWS), PaymentRow.created_at >= earliest)


def _straddlers(s: Session, sinces: Sequence[datetime]) -> list[Row[Any]]:
    """The cloud payments created before a window that may reach into it, each read once: made
    less than SHORT before it (any hours but a long one's end there), booked inside it (a bill
    spread up to its booking), or long (`ix_payments_cloud_long`: rare, read back CLOUD_SPAN).
    Each read starts near its window, so none walks the months of history before it."""
    params: dict[str, datetime] = {
        "long_from": min(sinces) - CLOUD_SPAN,
        "long_to": max(sinces),
    }
    for i, since in enumerate(sinces):
        params |= {
            f"since_{i}": since,
            f"short_{i}": since - SHORT - MARGIN,
            f"booked_{i}": since - MARGIN,
        }
    rows = s.execute(_straddlers_read(len(sinces)), params).all()
    return list({row.id: row for row in rows}.values())  # a row may answer several reads


@cache
def _straddlers_read(windows: int) -> CompoundSelect[Any]:
    """`_straddlers`' statement, built once."""
    columns = (
        PaymentRow.id,
        PaymentRow.amount,
        PaymentRow.created_at,
        PaymentRow.hours,
        PaymentRow.status,
        PaymentRow.updated_at,
    )
    created, cloud = PaymentRow.created_at, PaymentRow.nonce.like(CLOUD_ROWS)

    def at(name: str) -> BindParameter[datetime]:
        return bindparam(name, type_=created.type)

    reads = [
        select(*columns).where(
            cloud, PaymentRow.hours > LONG, created >= at("long_from"), created < at("long_to")
        )
    ]
    for i in range(windows):
        before = created < at(f"since_{i}")
        reads.append(select(*columns).where(cloud, created >= at(f"short_{i}"), before))
        booked = and_(PaymentRow.updated_at > created, PaymentRow.updated_at >= at(f"booked_{i}"))
        reads.append(select(*columns).where(cloud, booked, before))
    return union_all(*reads)


def _cloud_share(rows: Sequence[Row[Any]], since: datetime) -> float:
    """The share inside the window of cloud payments created before it (see `cloud_spent`)."""
    total = 0.0
    for _id, amount, created, hours, status, booked in rows:
        if created < since - CLOUD_SPAN or status not in SPENT:
            continue  # beyond this window's reach (read for a wider one), or no money moved
        span = max(0.0, hours or 0.0)
        if status == "completed":
            # A bill is booked once the instance has stopped billing, maybe long after its
            # reservation ran out (a terminate refused for a while, an instance abandoned to
            # the sweeper): spread to its booking, else the time billed past the reservation
            # would count in no window (an error high, never low).
            span = max(span, _hours(created, booked))
        if span <= 0:
            continue  # covering no time, it counts where it was made: before the window
        try:
            share = _hours(since, created + timedelta(hours=span)) / span
        except OverflowError:
            # Hours past any date (1e300, inf: a broken row, which once failed every check):
            # the part before the window is as good as none of them.
            share = 1.0 - _hours(created, since) / span
        total += amount * min(1.0, share)
    return total


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
