"""The spend caps' check (under the ledger's lock every payment waits on) counts the cloud
payments made inside each window by a sum in the database, and reads only the few made before
it that may reach into it, each by an index starting near the window, so its cost does not grow
with months of history; and what it counts is what the ledger counted before, payment by
payment (a property test against a copy of the former read, on both stores)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import ColumnElement, Row, case, delete, func, literal, or_, select
from sqlalchemy.orm import Session

from procure.models import utcnow
from procure.store import Store, ledger, open_store
from procure.store.ledger import CLOUD_ROWS, CLOUD_SPAN, SPENT, WINDOWS
from procure.store.tables import JobRow, PaymentRow, RunRow
from test_ledger_reads_cloud_payments_only import HOUR, _cloud, _payments, _x402
from test_scale_plans import full_scans, plans


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


# --- the former read (ledger.py before this change), kept as the reference ------------------

OLD_MARGIN = timedelta(minutes=1)


def _old_may_reach(s: Session, since: datetime) -> ColumnElement[bool]:
    cut = since - OLD_MARGIN
    most = CLOUD_SPAN.total_seconds() / 3600
    hours = case(
        (PaymentRow.hours > most, most), (PaymentRow.hours > 0, PaymentRow.hours), else_=0.0
    )
    if s.get_bind().dialect.name == "postgresql":
        reserved = PaymentRow.created_at + func.make_interval(0, 0, 0, 0, 0, 0, hours * 3600)
        reaches = reserved >= cut
    else:
        at = literal(cut, PaymentRow.created_at.type)
        reaches = func.julianday(PaymentRow.created_at) + hours / 24.0 >= func.julianday(at)
    return or_(PaymentRow.created_at >= cut, PaymentRow.updated_at >= cut, reaches)


def _old_cloud_spent_since(s: Session, sinces: Sequence[datetime]) -> list[list[float]]:
    """The former `cloud_spent_since`, returning each window's terms (rounded by the caller)."""
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
            _old_may_reach(s, earliest),
        )
    ).all()
    spent = [row for row in rows if row.status in SPENT]
    return [_old_cloud_share(spent, since) for since in sinces]


def _old_cloud_share(rows: Sequence[Row[Any]], since: datetime) -> list[float]:
    terms = []
    for amount, created, hours, status, booked in rows:
        if created < since - CLOUD_SPAN:
            continue
        span = max(0.0, hours or 0.0)
        if status == "completed":
            span = max(span, _hours(created, booked))
        # Deviation (a): a payment made inside the window counts in full, as the former read
        # meant (its span starts inside): it went through a microsecond-rounded timedelta, so
        # hours under half a microsecond counted nothing, and some others a hair under the
        # amount (see test_a_payment_of_a_sub_microsecond_span_counts_in_its_window).
        if span <= 0 or created >= since:
            terms.append(amount if created >= since else 0)
            continue
        try:
            inside = _hours(max(created, since), created + timedelta(hours=span))
            share = inside / span
        except OverflowError:
            # Deviation (b): the former read raised here, failing every check (see
            # test_a_cloud_payment_of_hours_past_any_date_fails_no_check).
            share = 1.0 - _hours(created, since) / span
        terms.append(amount * min(1.0, share))
    return terms


def _hours(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds() / 3600)


def _summed(terms: list[float]) -> float:
    total = 0.0
    for term in terms:  # in turn, as the former read added them
        total += term
    return total


# --- the property ---------------------------------------------------------------------------

US = timedelta(microseconds=1)
BASE = datetime(2026, 6, 1, tzinfo=UTC)
DAY_US = 86_400_000_000


def _edges() -> list[timedelta]:
    """Offsets from `now` where a payment's place in a window may flip: each window's start,
    a reservation ending there, the short read's start, the reach of CLOUD_SPAN; a microsecond
    either side."""
    out = [timedelta(0), timedelta(hours=1)]
    for width in WINDOWS.values():
        for back in (
            timedelta(0),
            timedelta(hours=1),
            timedelta(hours=23.9),
            timedelta(hours=24),
            timedelta(hours=24.1),
            ledger.SHORT + ledger.MARGIN,
            CLOUD_SPAN,
        ):
            out += [-(width + back) + d * US for d in (-1, 0, 1)]
    return out


offsets = st.one_of(
    st.sampled_from(_edges()),
    st.integers(-500 * DAY_US, 3_600_000_000).map(lambda us: timedelta(microseconds=us)),
)
hours = st.one_of(
    st.sampled_from(
        [
            *(None, 0.0, -1.0, -1e300, float("-inf"), float("nan")),  # covering no time
            *(1e-12, 1e-10, 1.4e-9, 1e-6, 0.5, 1.0, 23.9, 24.0, 24.1, 1000.0),
            *(1e8, 1e300, float("inf")),  # past any date
        ]
    ),
    st.floats(-10, 2_000, allow_nan=False),
)
statuses = st.sampled_from(["completed", "pending", "failed", "refused", "refunded"])
amounts = st.one_of(st.integers(0, 10), st.integers(10**6, 10**12), st.integers(0, 10**12))


def _near_a_window(draw: st.DrawFn, reach: float) -> timedelta:
    """An offset from `now` up to a little more than `reach` hours before a window's start, or
    just after it: where a payment of that many hours (or booked there) straddles the start,
    or just fails to; uniform offsets over 500 days would seldom land there."""
    start = draw(st.sampled_from(list(WINDOWS.values())))
    # Anywhere in its span, or ending within two hours of the window's start.
    part = draw(st.one_of(st.floats(0, 1.1), st.just(1.0)))
    back = timedelta(hours=min(reach, 600 * 24) * part)
    near = 120_000_000 if part != 1.0 else 7_200_000_000
    return -start - back + timedelta(microseconds=draw(st.integers(-near, near)))


@st.composite
def cloud_rows(draw: st.DrawFn) -> dict[str, Any]:
    held = draw(hours)
    reach = held if held is not None and math.isfinite(held) and held > 0 else 0.0
    near = draw(st.integers(0, 2))  # two in three near a window's start
    created = _near_a_window(draw, reach) if near else draw(offsets)
    where = draw(st.sampled_from(["now", "window", "made"]))
    if where == "now":  # booked at a window's edge, or long after
        booked = draw(offsets)
    elif where == "window":
        booked = _near_a_window(draw, 0.0)
    else:
        booked = created + timedelta(microseconds=draw(st.integers(-2 * DAY_US, 60 * DAY_US)))
    return {
        "amount": draw(amounts),
        "created": created,
        "hours": held,
        "status": draw(statuses),
        "booked": booked,
    }


x402_rows = st.fixed_dictionaries({"amount": amounts, "created": offsets, "status": statuses})


def _row(created: timedelta, hours: float | None, status: str, booked: timedelta) -> dict[str, Any]:
    return {
        "amount": 10**9 + 7,
        "created": created,
        "hours": hours,
        "status": status,
        "booked": booked,
    }


# Each window's straddlers at the edges of the reads that find them: the longest payment of the
# short read made as long before as it reaches, the shortest long one just past that, a bill
# booked just inside the window long after its hours, one of hours past any date.
EDGES = [
    row
    for start in WINDOWS.values()
    for row in (
        _row(-start - timedelta(hours=23.99), 24.0, "pending", -start - timedelta(days=1)),
        _row(-start - timedelta(hours=24.05), 24.1, "pending", -start - timedelta(days=1)),
        _row(-start - timedelta(days=3), 1.0, "completed", -start + timedelta(seconds=1)),
        _row(-start - timedelta(days=300), 1e300, "pending", -start - timedelta(days=300)),
    )
]


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    now_us=st.integers(-10 * DAY_US, 10 * DAY_US),
    clouds=st.lists(cloud_rows(), max_size=30),
    x402s=st.lists(x402_rows, max_size=5),
)
@example(now_us=0, clouds=EDGES, x402s=[])
def test_the_windows_hold_what_the_former_read_counted(
    store: Store, now_us: int, clouds: list[dict[str, Any]], x402s: list[dict[str, Any]]
) -> None:
    """Random histories of cloud and x402 payments (every status, hours none to past any date,
    made from 500 days ago to an hour ahead, booked before or long after they were made): each
    window holds exactly what the former read counted, but where a total lies within a few
    ulps of a half micro-USD (summed in another order, it may round the other way)."""
    now = BASE + timedelta(microseconds=now_us)
    with store.session() as s:
        for table in (PaymentRow, JobRow, RunRow):
            s.execute(delete(table))
    rows = []
    for row in clouds:
        made = _cloud(
            row["amount"], now + row["created"], row["hours"], "completed", now + row["booked"]
        )
        rows.append(made | {"status": row["status"]})
    for row in x402s:
        rows.append(_x402(row["amount"], now + row["created"]) | {"status": row["status"]})
    if rows:  # an empty insert would write a row of defaults
        _payments(store, rows)

    windows = list(WINDOWS)
    with store.session() as s:
        held = ledger.spent_in(s, windows, now=now)
        sinces = [now - WINDOWS[window] for window in windows]
        old = _old_cloud_spent_since(s, sinces)
        others = [
            ledger._x402_spent(s, since) + ledger.fleet_spent(s, since, now) for since in sinces
        ]
    for window, terms, other in zip(windows, old, others, strict=True):
        expected = other + round(_summed(terms))
        if held[window] == expected:
            continue
        # Only a total that sits at a half, to the error of adding its terms, may round apart.
        exact = sum((Fraction(term) for term in terms), Fraction(0))
        slack = len(terms) * math.ulp(max(1.0, float(abs(exact)))) * 4
        assert abs(held[window] - expected) == 1, (window, held, expected)
        assert abs(exact - math.floor(exact) - Fraction(1, 2)) <= slack, (window, exact)


# --- the cases where the former read was wrong --------------------------------------------


@pytest.mark.parametrize("hours", [1e8, 1e300, float("inf")])
def test_a_cloud_payment_of_hours_past_any_date_fails_no_check(store: Store, hours: float) -> None:
    """Before the fix: the share of a payment made before the window was found by adding its
    hours to its creation, which for hours past year 9999 (a broken row: 1e8, 1e300, inf)
    raised OverflowError: every cap check, so every payment and launch behind the caps, failed
    while the row stood. Now it counts as spread over those hours: next to all of it."""
    now = utcnow()
    _payments(store, [_cloud(3 * HOUR, now - timedelta(hours=48), hours, "pending", now)])
    caps = ledger.SpendCaps(per_hour=10 * HOUR, per_day=10 * HOUR, per_month=10 * HOUR)
    with store.session() as s:
        held = ledger.spent_in(s, ["hour", "day", "month"], now=now)
        refusal = ledger.global_cap_conflict(s, caps, 8 * HOUR, now=now)
    # Made 48 hours ago: what lies before each window is 47 or 24 of its hours (none of the
    # month's), so the window holds the rest.
    assert held["hour"] == pytest.approx(3 * HOUR * (1 - 47 / hours), abs=1)
    assert held["day"] == pytest.approx(3 * HOUR * (1 - 24 / hours), abs=1)
    assert held["month"] == 3 * HOUR
    assert refusal is not None and "per hour" in refusal


@pytest.mark.parametrize("hours", [1e-10, 1.4e-9])
def test_a_payment_of_a_sub_microsecond_span_counts_in_its_window(
    store: Store, hours: float
) -> None:
    """Before the fix: a payment made inside the window was counted through its end rounded to
    the microsecond: one of 1e-10 hours (a third of a microsecond) ended where it began and
    counted nothing, one of 1.4e-9 hours 99.2% of it: a window held less than was spent. Now
    a payment made inside the window counts in full, as one covering no time does."""
    now = utcnow()
    _payments(
        store,
        [_cloud(HOUR, now - timedelta(minutes=10), hours, "pending", now - timedelta(minutes=10))],
    )
    with store.session() as s:
        assert ledger.spent_in(s, ["hour", "day"], now=now) == {"hour": HOUR, "day": HOUR}


# --- the reads ------------------------------------------------------------------------------


def test_the_check_reads_each_window_from_near_its_start(store: Store) -> None:
    """Before the fix: the one read of cloud payments started 430 days back (the month's window
    less CLOUD_SPAN) and walked every cloud payment since to keep those that may reach: with
    30,000 runs over a year the check took 7 times (SQLite) and twice (PostgreSQL) what it
    took with 1,000. Now the whole amounts are one
    sum over the month by `ix_payments_cloud_created`, and the rows made before a window come
    from three reads each bounded near it: made in the 24 hours before it
    (`ix_payments_cloud_created`), booked inside it (`ix_payments_cloud_booked`), or long
    (`ix_payments_cloud_long`); each plan shows a bounded index read, none a scan."""
    now = utcnow()
    _payments(
        store,
        [_x402(HOUR, now - timedelta(days=d)) for d in range(0, 300, 30)]
        + [_cloud(HOUR, now - timedelta(days=d), 1.0, "completed", now) for d in (0, 2, 100)]
        + [_cloud(HOUR, now - timedelta(days=40), 2000.0, "pending", now)],
    )
    caps = ledger.SpendCaps(per_hour=10**9, per_day=10**9, per_month=10**9)
    found = plans(store, lambda s: ledger.global_cap_conflict(s, caps, 1, now=now), sorted_=False)
    cloud = [(sql, plan) for sql, plan in found if "LIKE 'cloud-" in sql]
    assert len(cloud) == 2, found  # the sum and the straddlers, for the three windows at once
    (sum_sql, sum_plan), (read_sql, read_plan) = sorted(cloud, key=lambda p: "hours" in p[0])
    assert "ix_payments_cloud_created" in sum_plan, f"{sum_sql}\n{sum_plan}"
    assert not full_scans(sum_plan, "payments", store.is_sqlite), f"{sum_sql}\n{sum_plan}"

    assert not full_scans(read_plan, "payments", store.is_sqlite), f"{read_sql}\n{read_plan}"
    named = set(re.findall(r"ix_payments_cloud_\w+", read_plan))
    expected = {"ix_payments_cloud_created", "ix_payments_cloud_booked", "ix_payments_cloud_long"}
    assert named == expected, read_plan
    if store.is_sqlite:
        reads = [line for line in read_plan.splitlines() if "payments" in line]
        assert len(reads) == 7, read_plan  # the long ones, and two for each window
        # Each a range of its index (a bound), not the whole of it.
        assert all(re.search(r"USING INDEX ix_payments_cloud_\w+ \(\w+>", r) for r in reads), reads
    else:
        scans = re.findall(r"Index Scan using ix_payments_cloud_\w+", read_plan)
        assert len(scans) == 7, read_plan
        assert read_plan.count("Index Cond") == 7, read_plan  # each a range, not the index
