"""The one spend ledger's windows against late bills and skewed clocks: cloud time booked past
its reservation counts in the window it was billed in, an instance recorded on a clock a little
ahead of the checker's still counts, and a run waiting on a global cap while the fleet's
instances run says so once."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

from cloud_fakes import FakeCloud, FakeInstance, cloud_vendor, make_deps, offer
from procure.agent.cloud_money import book_end
from procure.agent.cloud_sweeper import sweep
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.models import (
    Job,
    JobSpec,
    JobStatus,
    OfferTerms,
    Payment,
    PaymentStatus,
    format_usd,
    utcnow,
)
from procure.store import Store, cloud_repo, fleet_repo, ledger, open_store, repo
from procure.store.spend import spend_summary
from world import World, state_of

PRICE = 8_000_000  # $8/h, micro-USD
HOURLY_CAP = ledger.SpendCaps(per_hour=10_000_000)  # $10/h
TERMS = OfferTerms(
    provider="lambda",
    offer_id="gpu_1x_a100",
    gpu="A100",
    gpu_count=1,
    region="r1",
    price_per_hour=PRICE,
    interruptible=False,
    billing_increment_s=60,
    boot_s=60.0,
)


def _cloud_job(store: Store, started: datetime, reserved_h: float) -> tuple[Job, str]:
    """A run renting one $8/h instance since `started`, its reservation (one pending `cloud-…`
    payment, as cloud_run and cloud_money.reserve write it) covering `reserved_h` hours."""
    with store.session() as s:
        repo.save_vendor(s, cloud_vendor("la", "lambda", 10.0))
        run = repo.create_run(
            s, user_id="u", goal="train", budget_total=1_000_000_000, job_spec=JobSpec()
        )
        job = Job(
            _id=repo.new_id(),
            run_id=run.id,
            vendor_id="la",
            status=JobStatus.running,
            expected_cost=PRICE * 10,
            job_params={},
            idempotency_key="",
            created_at=started,
            updated_at=started,
        )
        job.idempotency_key = f"job-{job.id}"
        repo.insert_job(s, job)
        s.flush()
        payment_id = repo.new_id()
        repo.insert_payment(
            s,
            Payment(
                _id=payment_id,
                run_id=run.id,
                job_id=job.id,
                vendor_id="la",
                amount=round(PRICE * reserved_h),
                status=PaymentStatus.pending,
                nonce=f"cloud-{payment_id}",
                hours=reserved_h,
                created_at=started,
                updated_at=started,
            ),
        )
        name = f"procure-job-h96-{job.id}"
        cloud_repo.insert_instance(
            s,
            name=name,
            run_id=run.id,
            job_id=job.id,
            vendor_id="la",
            provider="lambda",
            offer=TERMS.model_dump(),
            instance_id="i-1",
            status="terminating",
            node_token="x",
            launched_at=started,
            active_at=started,
            reserved_until=started + timedelta(hours=reserved_h),
        )
    return job, name


def test_cloud_time_billed_past_its_reservation_counts_in_the_hourly_cap(db_url: str) -> None:
    """Before the fix: `book_end` booked a bill for time past the reservation (a terminate the
    provider refused for a while, or a bill larger than reserved) but kept the payment's
    reserved span, over which the ledger spreads it: an $8/h instance that billed until now
    counted $0 in the last hour, so a $10/h cap let $9 more through ($17 in the hour)."""
    store = open_store(db_url)
    try:
        now = utcnow()
        started = now - timedelta(hours=3)
        # Reserved for its first hour; the provider refused the terminate and billed 3 h.
        job, name = _cloud_job(store, started, reserved_h=1.0)
        with store.session() as s:
            cloud_repo.update_instance(s, name, ended_at=now)
            inst = cloud_repo.get_instance(s, name)
        deps = make_deps(store, {})
        billed = PRICE * 3
        book_end(deps, None, job, inst, billed, "completed", "done")  # type: ignore[arg-type]
        with store.session() as s:
            last_hour = spend_summary(s, now)["windows"]["hour"]
            conflict = ledger.global_cap_conflict(s, HOURLY_CAP, 9_000_000, now=now)
            paid = spend_summary(s, now)["paid"]
        assert paid == 24, paid
        assert last_hour >= 8, f"`procure spend` says the last hour cost ${last_hour}"
        assert conflict is not None, "a $9 payment passed a $10/h cap beside $8 billed this hour"
    finally:
        store.dispose()


def test_an_abandoned_instance_s_bill_booked_by_the_sweeper_counts_in_the_hourly_cap(
    db_url: str,
) -> None:
    """Before the fix: an instance whose end could not be confirmed is abandoned to the sweeper
    with its reservation (1 h); it bills on for 2 h more, and the sweeper books the whole bill
    on that payment, whose span the ledger still took as the reservation's: $8/h billed until
    now counted $0 in the last hour, and a $10/h cap let $9 more through."""
    store = open_store(db_url)
    try:
        now = utcnow()
        job, name = _cloud_job(store, now - timedelta(hours=3), reserved_h=1.0)
        with store.session() as s:  # abandoned (cloud_end.abandon): no live run owns it now
            repo.update_job(s, job.id, status=JobStatus.failed, completed_at=now)
            repo.update_run(s, job.run_id, status="failed")
        cloud = FakeCloud("lambda", [])
        three_hours_ago = cloud.clock() - 3 * 3600
        cloud.instances["i-1"] = FakeInstance(
            "i-1",
            name,
            offer("lambda", "gpu_1x_a100", PRICE / 1e6, increment=60),
            three_hours_ago,
            status="active",
            active_at=three_hours_ago,
        )
        assert asyncio.run(sweep(make_deps(store, {"lambda": cloud}))) == [name]
        with store.session() as s:
            summary = spend_summary(s, now)
            conflict = ledger.global_cap_conflict(s, HOURLY_CAP, 9_000_000, now=now)
        assert summary["paid"] >= 24, summary
        last_hour = summary["windows"]["hour"]
        assert last_hour >= 8, f"`procure spend` says the last hour cost ${last_hour}"
        assert conflict is not None, "a $9 payment passed a $10/h cap beside $8 billed this hour"
    finally:
        store.dispose()


def test_a_fleet_instance_first_seen_on_a_clock_ahead_still_counts(db_url: str) -> None:
    """Before the fix: the ledger skipped every fleet instance first seen after the checker's
    `now`: an $8/h instance the fleet controller (its clock 30 s ahead of the worker's) recorded
    a moment ago counted nothing, in the caps and in `procure spend`'s windows, so a worker's
    $9 payment passed a $10/h cap beside it."""
    store = open_store(db_url)
    try:
        now = utcnow()
        with store.session() as s:
            fleet_repo.upsert_instance(
                s,
                now + timedelta(seconds=30),  # the controller's clock
                instance_id="i-fleet",
                name="procure-fleet-1",
                instance_type="gpu_1x_a100",
                region="r1",
                ip=None,
                status="active",
                price_per_hour=PRICE,
                gpus=1,
                launched_by=None,
            )
        with store.session() as s:
            last_hour = spend_summary(s, now)["windows"]["hour"]
            conflict = ledger.global_cap_conflict(s, HOURLY_CAP, 9_000_000, now=now)
        assert last_hour >= 8, f"`procure spend` says the last hour holds ${last_hour}"
        assert conflict is not None, "a $9 payment passed a $10/h cap beside an $8/h instance"
    finally:
        store.dispose()


def _fleet_instance(store: Store, first_seen: datetime, price: int) -> None:
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            first_seen,
            instance_id="i-fleet",
            name="procure-fleet-1",
            instance_type="gpu_8x_h100",
            region="r1",
            ip=None,
            status="active",
            price_per_hour=price,
            gpus=8,
            launched_by=None,
        )


def _last_hour_usd(store: Store) -> str:
    with store.session() as s:
        return format_usd(ledger.spent(s, "hour", now=utcnow()))


def test_a_run_waiting_on_a_cap_beside_a_running_fleet_says_so_once(world: World) -> None:
    """Before the fix: a run held by a global cap said why once per *wording*, and the wording
    holds the window's spend to the cent, which moves every few seconds while a fleet instance
    runs (its hour slides): a waiting run, ticked every second, added a "Waiting to pay" line
    to its timeline every few ticks, for as long as the cap held it (hours; a month cap: days)."""
    _fleet_instance(world.store, utcnow() - timedelta(minutes=90), 30_000_000)  # $30/h
    run_id = world.new_run(budget=5.0)

    async def once() -> str:
        deps = world.deps()
        deps.spend_caps = ledger.SpendCaps(per_hour=1_000_000)  # $1/h, the fleet holds more
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    assert asyncio.run(once()) == "Waiting for the global spend cap"
    kept = len(state_of(world, run_id).observations)
    for _ in range(3):
        seen = _last_hour_usd(world.store)
        deadline = time.monotonic() + 60
        while _last_hour_usd(world.store) == seen:  # the hour slides: its cents move on
            assert time.monotonic() < deadline, "the last hour's spend never moved"
            time.sleep(0.05)
        assert asyncio.run(once()) == "Waiting for the global spend cap"
    state = state_of(world, run_id)
    notes = [o.content for o in state.observations if "global spend cap" in o.content]
    assert len(notes) == 1, notes
    assert len(state.observations) == kept
