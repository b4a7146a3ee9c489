"""The global spend caps' check, taken under the ledger's lock before every payment, reads the
cloud instances' payments by an index of their own (not every payment of the last 400 days),
once for its three windows, and brings back only those that may reach them; what it counts
stays what it was: each cloud payment spread over the time it covers, reservations ahead and
late bookings included."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from procure.models import utcnow
from procure.store import Store, ledger, open_store
from procure.store.tables import JobRow, PaymentRow, RunRow
from test_scale_plans import full_scans, plans

HOUR = 1_000_000  # micro-USD per hour: an instance at $1/h


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


def _payments(store: Store, rows: list[dict[str, Any]]) -> None:
    """Each payment on a run and job of its own, as procure writes them."""
    at = utcnow()
    runs, jobs, pays = [], [], []
    for row in rows:
        run_id, job_id = uuid.uuid4().hex[:24], uuid.uuid4().hex[:24]
        runs.append(
            {
                "id": run_id,
                "user_id": "u",
                "goal": "g",
                "status": "running",
                "budget_total": 10**12,
                "budget_remaining": 0,
                "job_spec": {},
                "progress": 0.0,
                "created_at": at,
                "updated_at": at,
            }
        )
        jobs.append(
            {
                "id": job_id,
                "run_id": run_id,
                "vendor_id": "lambda",
                "status": "running",
                "expected_cost": 1,
                "job_params": {},
                "idempotency_key": f"job-{job_id}",
                "created_at": at,
                "updated_at": at,
            }
        )
        pays.append(
            {
                "id": uuid.uuid4().hex[:24],
                "run_id": run_id,
                "job_id": job_id,
                "vendor_id": "lambda",
                "currency": "USD",
                **row,
            }
        )
    with store.session() as s:
        s.execute(insert(RunRow), runs)
        s.execute(insert(JobRow), jobs)
        s.execute(insert(PaymentRow), pays)


def _cloud(
    amount: int, created: datetime, hours: float, status: str, booked: datetime
) -> dict[str, Any]:
    return {
        "amount": amount,
        "created_at": created,
        "hours": hours,
        "status": status,
        "updated_at": booked,
        "nonce": f"cloud-{uuid.uuid4().hex}",
    }


def _x402(amount: int, created: datetime) -> dict[str, Any]:
    return {
        "amount": amount,
        "created_at": created,
        "status": "completed",
        "updated_at": created,
        "nonce": "0x" + uuid.uuid4().hex * 2,
        "x402_tx_id": "0x" + uuid.uuid4().hex,
    }


def test_the_cap_check_reads_cloud_payments_by_their_own_index(store: Store) -> None:
    """Before the fix: the cloud share of a window was read off the status index over 400 days
    (the cloud nonce is no part of it): every spent payment of the last 400 days, each cap
    check, under the ledger's lock that every spender waits on. On a year of 100,000 payments
    that was 0.15 s a check with no cloud payment at all (0.6 s with a tenth on clouds)."""
    now = utcnow()
    _payments(
        store,
        [_x402(HOUR, now - timedelta(days=d)) for d in range(0, 300, 30)]
        + [_cloud(HOUR, now - timedelta(days=2), 1.0, "completed", now - timedelta(days=2))],
    )
    caps = ledger.SpendCaps(per_hour=10**9, per_day=10**9, per_month=10**9)
    found = plans(store, lambda s: ledger.global_cap_conflict(s, caps, 1, now=now), sorted_=False)
    # The cloud share's reads: the only ones that need the hours a payment covers.
    cloud = [(sql, plan) for sql, plan in found if re.search(r"\bpayments\.hours\b", sql)]
    assert len(cloud) == 1, found  # one read for the three windows
    for sql, plan in cloud:
        assert "ix_payments_cloud_created" in plan, f"{sql}\n{plan}"
        assert not full_scans(plan, "payments", store.is_sqlite), f"{sql}\n{plan}"


def test_each_cloud_payment_still_counts_for_the_time_it_covers(store: Store) -> None:
    """What the windows hold, payment by payment, as before the ledger read less: a long-running
    instance reserved into the window though last reserved before it, a bill booked inside the
    window long after its reservation ran out, a late launch booked when found, and an
    instance long gone (nothing in the hour, all of it in the month)."""
    now = utcnow()
    days = 200 * 24
    _payments(
        store,
        [
            # Running for 200 days, reserved two hours ago up to an hour from now.
            _cloud(
                (days + 1) * HOUR,
                now - timedelta(hours=days),
                days + 1,
                "pending",
                now - timedelta(hours=2),
            ),
            # Reserved for an hour three days ago, booked half an hour ago: 71.5 hours.
            _cloud(
                round(71.5 * HOUR),
                now - timedelta(hours=72),
                1.0,
                "completed",
                now - timedelta(minutes=30),
            ),
            # A launch booked when found, covering no time: counts where it was booked.
            _cloud(123, now - timedelta(minutes=10), 0.0, "completed", now - timedelta(minutes=10)),
            # Two hours ten days ago.
            _cloud(2 * HOUR, now - timedelta(days=10), 2.0, "completed", now - timedelta(days=10)),
            # Failed: no money moved.
            _cloud(5 * HOUR, now - timedelta(minutes=5), 5.0, "failed", now - timedelta(minutes=5)),
        ],
    )
    with store.session() as s:
        hour = ledger.cloud_spent(s, now - timedelta(hours=1))
        month = ledger.cloud_spent(s, now - timedelta(days=30))
        together = ledger.spent_in(s, ["hour", "day", "month"], now=now)
        one_by_one = {window: ledger.spent(s, window, now=now) for window in together}
    assert together == one_by_one  # the windows read together hold what each does alone
    # The hour: two hours of the long instance (the last and the one reserved ahead), the half
    # hour of the late bill inside it, the late launch.
    assert hour == pytest.approx(2 * HOUR + HOUR // 2 + 123, abs=2)
    # The month: 31 days of the long instance (30 and the hour ahead), all of the others.
    assert month == pytest.approx((30 * 24 + 1) * HOUR + 71.5 * HOUR + 123 + 2 * HOUR, abs=2)
