"""The guard's renewal price check: a vendor selling a sliver of the slice asked for at its price
plus a whole payment fee is not paid (a fee per sliver, renewal after renewal), while a job's own
last sliver still renews at the same price."""

from __future__ import annotations

from procure.agent.context import PlanContext
from procure.agent.guard import check_renewal
from procure.models import Job, JobStatus, Payment, PaymentStatus, Quote, usd_to_micros
from procure.sim.market import charge
from test_planner_deadlines_failures_and_slivers import FEE, NOW, STANDARD, context


def _job(price: int, hours: float, slice_hours: float) -> Job:
    return Job(
        _id="j1",
        run_id="run1",
        vendor_id=STANDARD.vendor_id,
        status=JobStatus.running,
        expected_cost=round(price * hours),
        job_params={"hours": hours, "totalHours": hours},
        idempotency_key="k1",
        slice_hours=slice_hours,
        created_at=NOW,
        updated_at=NOW,
    )


def _renewal_ctx(job: Job, first: Quote) -> PlanContext:
    paid = Payment(
        _id="p0",
        run_id="run1",
        job_id=job.id,
        vendor_id=job.vendor_id,
        amount=first.amount,
        status=PaymentStatus.completed,
        nonce="n0",
        hours=first.hours,
        created_at=NOW,
        updated_at=NOW,
    )
    ctx = context([STANDARD], hours=2.0, checkpoint_every=0.25, budget="50", deadline_in=None)
    state = ctx.state.model_copy(update={"payments": [paid], "jobs": [job]})
    return PlanContext(
        state=state, vendors=ctx.vendors, now=NOW, payment_overhead=usd_to_micros(FEE)
    )


def _quote(qid: str, price: int, hours: float) -> Quote:
    # Its own price per hour, and the amount `check_quote_terms` lets through: hours x price
    # plus one payment's fee.
    return Quote(
        quote_id=qid,
        vendor_id=STANDARD.vendor_id,
        gpu_type="A100",
        hours=hours,
        price_per_hour=price,
        amount=charge(price, hours) + usd_to_micros(FEE),
    )


def test_a_renewal_selling_a_sliver_of_the_slice_for_a_whole_fee_is_not_paid() -> None:
    """Before the fix: the guard compared a renewal's quoted price per hour, not what it costs
    per hour, so a vendor selling 3.6 s of a 15-minute slice at its price plus a payment's fee
    ($6.45/h real at a $0.005 fee, 4.4 x its $1.45/h quoted) was paid, renewal after renewal,
    a fee for each sliver."""
    price = STANDARD.base_price_per_hour
    job = _job(price, hours=2.0, slice_hours=0.25)
    ctx = _renewal_ctx(job, _quote("q0", price, 0.25))

    sliver = _quote("q1", price, 0.001)  # asked for 0.25 h, sold 0.001 h
    assert sliver.amount / sliver.hours > 3 * price  # what it really costs per hour

    why = check_renewal(ctx, job, sliver)
    assert why is not None and "raised its price" in why, why
    # A renewal selling the slice asked for, at the same price, is still paid.
    assert check_renewal(ctx, job, _quote("q2", price, 0.25)) is None
    # As is the job's last sliver, asked for as such (its fee on few minutes is no price rise).
    last = _job(price, hours=0.26, slice_hours=0.25)
    assert (
        check_renewal(
            _renewal_ctx(last, _quote("q0", price, 0.25)), last, _quote("q3", price, 0.01)
        )
        is None
    )
