"""A seller still settling a payment, tick by tick: a run's store set up by hand, the seller's
answers and the ledger scripted, to reach the moments the live tests cannot aim at (a paid
submit the seller has not booked yet, a slice settled while its seller asked for longer than
the grace, a busy seller before anything was signed). Each was a bug found in review."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.models import Job, JobStatus, Payment, PaymentStatus, Quote, utcnow
from procure.payments.payer import payment_nonce
from procure.payments.settlements import Settlement
from procure.store import repo
from procure.store.tables import PaymentRow
from procure.vendors.client import PaymentInDoubt
from procure.vendors.protocol import VendorJob
from world import World, start_world, state_of

VENDOR = "gpu_vendor_2"  # $2.10/h: a quarter-hour slice is 525_000 micro-USD
SLICE = 525_000


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url)
    yield w
    w.stop()


class FakeVendor:
    """The vendor's side of the protocol, scripted: `status` and `renew` answer what a test
    sets; every call is counted."""

    def __init__(self, status: VendorJob | None, renew_error: Exception | None = None) -> None:
        self.answer = status
        self.renew_error = renew_error
        self.calls: list[str] = []

    async def status(self, vendor: Any, **kwargs: Any) -> VendorJob | None:
        self.calls.append("status")
        return self.answer

    async def quote(self, vendor: Any, spec: Any, *, job_id: str | None = None) -> Quote:
        self.calls.append("quote")
        return Quote(
            quote_id="q1",
            vendor_id=VENDOR,
            gpu_type="H100",
            hours=spec.hours,
            price_per_hour=2_100_000,
            amount=round(2_100_000 * spec.hours),
        )

    async def renew(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("renew")
        assert self.renew_error is not None
        raise self.renew_error


class FakeLedger:
    """The facilitator's ledger: the nonces in `used` settled, the others did not."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    async def lookup(self, payer: str, nonce: str) -> Settlement:
        if nonce in self.used:
            return Settlement(True, "0x" + "ab" * 32, SLICE)
        return Settlement(False, None)


def _job(world: World, run_id: str, status: JobStatus, progress: float) -> Job:
    state = state_of(world, run_id)
    params = state.run.job_spec.model_copy(update={"hours": 1.0}).model_dump(by_alias=True)
    params["totalHours"] = 1.0
    now = utcnow() - timedelta(minutes=10)
    job = Job(
        _id=repo.new_id(),
        run_id=run_id,
        vendor_id=VENDOR,
        vendor_job_id="vj-1" if status == JobStatus.running else None,
        status=status,
        expected_cost=4 * SLICE,
        job_params=params,
        idempotency_key="",
        quote_id="q0",
        progress=progress,
        slice_hours=0.25,
        progressed_at=utcnow(),
        created_at=now,
        updated_at=now,
    )
    job.idempotency_key = f"job-{job.id}"
    return job


def _payment(job: Job, status: PaymentStatus, age_s: float, **values: Any) -> Payment:
    when = utcnow() - timedelta(seconds=age_s)
    pid = repo.new_id()
    return Payment(
        _id=pid,
        run_id=job.run_id,
        job_id=job.id,
        vendor_id=VENDOR,
        amount=SLICE,
        status=status,
        nonce=payment_nonce(pid),
        hours=0.25,
        created_at=when,
        updated_at=when,
        **values,
    )


def _store(world: World, job: Job, *payments: Payment) -> None:
    with world.store.session() as s:
        repo.insert_job(s, job)
        for p in payments:
            repo.insert_payment(s, p)
        repo.refresh_budget(s, job.run_id)


def _deps(world: World, vendor: FakeVendor, ledger: FakeLedger) -> Any:
    deps = world.deps()
    asyncio.run(close_deps(deps))  # its real clients are not used
    deps.vendors = vendor  # type: ignore[assignment]
    deps.ledger = ledger  # type: ignore[assignment]
    return deps


def _settling(seconds: float) -> dict[str, Any]:
    """What `outcomes.seller_settling` leaves on a payment its seller is settling."""
    return {
        "error_message": f"being settled by {VENDOR}: renew-job: HTTP 503",
        "ask_again_at": utcnow() + timedelta(seconds=seconds),
    }


def test_paid_submit_is_not_failed_while_its_seller_still_asks_for_time(world: World) -> None:
    """The seller answered the paid submit 503 'still being settled', Retry-After 120 s.
    20 s later the ledger shows the money moved, but the seller has not booked the job yet:
    its job-status by key has no such job. That is not 'paid but no record': the job is not
    failed and the seller not blamed (else the run would pay another seller for the work)."""
    run_id = world.new_run(gpu_type="H100")
    job = _job(world, run_id, JobStatus.submitted, 0.0)
    first = _payment(job, PaymentStatus.pending, 20, **_settling(100))
    _store(world, job, first)
    ledger = FakeLedger()
    ledger.used.add(first.nonce)
    deps = _deps(world, FakeVendor(None), ledger)

    message = asyncio.run(tick(deps, run_id)).message
    state = state_of(world, run_id)
    [stored] = state.jobs
    with world.store.session() as s:
        vendor = repo.get_vendor(s, VENDOR)
    assert vendor is not None
    assert stored.status != "failed", (message, stored.error_message)
    assert vendor.failures == 0, message


def test_settled_slice_keeps_its_job_while_the_sellers_retry_after_runs(world: World) -> None:
    """A slice's seller answered 503 'still being settled' with Retry-After 120 s; the
    ledger then shows the slice paid and the agent books it. The seller may book it only after
    its Retry-After; meanwhile it reports the job 'expired' at its old paid limit. 31 s later
    (past a grace counted from the booking alone) the job is still kept: the seller was paid
    for those hours and said when it would know."""
    run_id = world.new_run(gpu_type="H100")
    job = _job(world, run_id, JobStatus.running, 0.25)
    first = _payment(job, PaymentStatus.completed, 600)
    slice_ = _payment(job, PaymentStatus.pending, 5, **_settling(115))
    _store(world, job, first, slice_)
    ledger = FakeLedger()
    ledger.used.add(slice_.nonce)
    expired = VendorJob(job_id="vj-1", status="expired", progress=0.25)
    deps = _deps(world, FakeVendor(expired), ledger)

    assert asyncio.run(tick(deps, run_id)).message == "Slice payment settled or expired"
    # 31 s pass: the seller's Retry-After (115 s more) is far from over.
    with world.store.session() as s:
        s.execute(
            update(PaymentRow)
            .where(PaymentRow.id == slice_.id)
            .values(updated_at=utcnow() - timedelta(seconds=31))
        )
    message = asyncio.run(tick(deps, run_id)).message
    [stored] = state_of(world, run_id).jobs
    assert stored.status == "running", (message, stored.error_message)


def test_unsigned_busy_renewal_honours_retry_after_and_claims_nothing(world: World) -> None:
    """A busy seller answers a renewal's first attempt 503 + Retry-After 60 before anything
    was signed: the next tick does not ask again within those 60 s, and nothing says the
    seller may hold a payment (no signature ever left)."""
    run_id = world.new_run(gpu_type="H100")
    job = _job(world, run_id, JobStatus.running, 0.24)
    _store(world, job, _payment(job, PaymentStatus.completed, 600))
    busy = PaymentInDoubt(
        "renew-job: HTTP 503: busy", status=503, retry_after_s=60.0, payment_sent=False
    )
    running = VendorJob(job_id="vj-1", status="running", progress=0.245)
    vendor = FakeVendor(running, renew_error=busy)
    deps = _deps(world, vendor, FakeLedger())

    first = asyncio.run(tick(deps, run_id)).message
    second = asyncio.run(tick(deps, run_id)).message
    state = state_of(world, run_id)
    claims = [o.content for o in state.observations if "cannot confirm yet" in o.content]
    problems = []
    if vendor.calls.count("renew") > 1:
        problems.append(f"asked again within Retry-After: {first!r}, {second!r}")
    if claims:
        problems.append(f"claimed held: {claims}")
    assert problems == []
