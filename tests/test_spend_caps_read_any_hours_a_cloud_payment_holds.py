"""The spend caps' check reads every cloud payment whatever hours it holds: a row whose hours are
hugely negative (a broken write, a clock gone backwards into a reservation's length) is a
payment covering no time, as the ledger has always counted it, not a database error that
refuses every payment and launch behind the caps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from procure.models import utcnow
from procure.store import Store, ledger, open_store
from test_ledger_reads_cloud_payments_only import HOUR, _cloud, _payments


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


@pytest.mark.parametrize("hours", [-1e300, float("-inf")])
def test_a_cloud_payment_with_hugely_negative_hours_counts_where_it_was_made(
    store: Store, hours: float
) -> None:
    """Before the fix: the prefilter capped hours above (1e300) but not below, so on PostgreSQL
    `make_interval(secs => hours * 3600)` raised 'interval out of range' for a row of -1e300
    hours: every cap check (each payment, each launch) failed while the row stood."""
    now = utcnow()
    _payments(
        store,
        [
            # Made two days ago (before both windows), so only its hours could bring it in.
            _cloud(3 * HOUR, now - timedelta(days=2), hours, "pending", now - timedelta(days=2)),
            _cloud(5 * HOUR, now - timedelta(hours=3), hours, "pending", now - timedelta(hours=3)),
            _cloud(HOUR, now - timedelta(minutes=20), 1.0, "pending", now),
        ],
    )
    caps = ledger.SpendCaps(per_hour=2 * HOUR, per_day=6 * HOUR)
    with store.session() as s:
        held = ledger.spent_in(s, ["hour", "day"], now=now)
        refusal = ledger.global_cap_conflict(s, caps, HOUR, now=now)
    # Covering no time, a broken row counts whole where it was made: the one of three hours
    # ago in the day, not the hour; the one of two days ago in neither.
    assert held["hour"] == pytest.approx(HOUR, abs=2)
    assert held["day"] == pytest.approx(6 * HOUR, abs=2)
    assert refusal is not None and "per day" in refusal
