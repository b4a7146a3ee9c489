"""The global spend ledger: agent payments (completed and pending) and fleet instance-hours
count against the same caps per hour, day and month; failed payments and old spend do not."""

from __future__ import annotations

from datetime import timedelta

from procure.models import JobSpec, usd_to_micros, utcnow
from procure.store import fleet_repo, ledger, open_store, repo
from procure.store.tables import JobRow, PaymentRow


def test_global_caps_span_payments_and_instance_hours(db_url: str) -> None:
    store = open_store(db_url)
    now = utcnow()
    try:
        with store.session() as s:
            run = repo.create_run(
                s, user_id="u", goal="g", budget_total=usd_to_micros(100), job_spec=JobSpec()
            )
            s.add(
                JobRow(
                    id="job1",
                    run_id=run.id,
                    vendor_id="v",
                    status="running",
                    expected_cost=0,
                    job_params={},
                    idempotency_key="k1",
                    created_at=now,
                    updated_at=now,
                )
            )
            for n, (usd, status, age_h) in enumerate(
                [
                    (3, "completed", 0.5),
                    (2, "pending", 0.2),
                    (50, "failed", 0.1),
                    (7, "completed", 30),
                ]
            ):
                at = now - timedelta(hours=age_h)
                s.add(
                    PaymentRow(
                        id=f"p{n}",
                        run_id=run.id,
                        job_id="job1",
                        vendor_id="v",
                        amount=usd_to_micros(usd),
                        currency="USDC",
                        status=status,
                        nonce=f"0x{n:064x}",
                        created_at=at,
                        updated_at=at,
                    )
                )
            # An instance at $2/h running for 90 minutes, one that ran 2 hours, ended a day ago.
            fleet_repo.upsert_instance(
                s,
                now - timedelta(minutes=90),
                instance_id="i-1",
                name=None,
                instance_type="gpu_1x_a100",
                region="r",
                ip=None,
                status="active",
                price_per_hour=usd_to_micros(2),
                gpus=1,
                launched_by=None,
            )
            fleet_repo.upsert_instance(
                s,
                now - timedelta(hours=26),
                instance_id="i-2",
                name=None,
                instance_type="gpu_1x_a100",
                region="r",
                ip=None,
                status="active",
                price_per_hour=usd_to_micros(1),
                gpus=1,
                launched_by=None,
            )
            fleet_repo.end_instances(s, ["i-2"], now - timedelta(hours=24))

        with store.session() as s:
            # Last hour: payments $5 + i-1 for the hour ($2) + the rest of its started hour ($1).
            assert ledger.spent(s, "hour", now=now) == usd_to_micros(8)
            # Last day: $5 + i-1's 1.5 h + its half hour left = $9.
            assert ledger.spent(s, "day", now=now) == usd_to_micros(9)
            # Month: + the old $7 payment and i-2's 2 hours = $18.
            assert ledger.spent(s, "month", now=now) == usd_to_micros(18)
            assert ledger.fleet_spent(s, now - timedelta(days=30), now, forward=False) == (
                usd_to_micros(5)
            )
            caps = ledger.SpendCaps(per_hour=usd_to_micros(10), per_month=usd_to_micros(25))
            assert ledger.global_cap_conflict(s, caps, usd_to_micros(2), now=now) is None
            hour = ledger.global_cap_conflict(s, caps, usd_to_micros(2.5), now=now)
            assert hour and hour.startswith("global spend cap per hour ($10.00)")
            month = ledger.global_cap_conflict(
                s, ledger.SpendCaps(per_month=usd_to_micros(25)), usd_to_micros(8), now=now
            )
            assert month and "per month ($25.00)" in month
            assert ledger.global_cap_conflict(s, ledger.SpendCaps(), 10**12, now=now) is None
    finally:
        store.dispose()


def test_caps_come_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PROCURE_MAX_SPEND_PER_DAY", "250.5")
    caps = ledger.load_caps()
    assert caps == ledger.SpendCaps(per_day=250_500_000)
    assert caps.items() == [("day", 250_500_000)]
