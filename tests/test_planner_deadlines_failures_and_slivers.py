"""The cost-aware planner with a deadline: when a failure would miss it, the steadier vendor the
budget allows, and slices short enough that a failure leaves money to finish; and the guard
renewing a last sliver at the same price per hour (its fee read as a price rise stopped the job
for a second start-up, late when the deadline was close)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from procure.agent.context import PlanContext
from procure.agent.guard import check_renewal
from procure.agent.planner import plan_cost_aware
from procure.agent.slices import next_slice_hours
from procure.models import (
    Job,
    JobSpec,
    JobStatus,
    Payment,
    PaymentStatus,
    Quote,
    Run,
    RunState,
    Vendor,
    usd_to_micros,
)
from procure.sim.market import charge
from test_planner_cost import vendor

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
FEE = "0.005"


def context(
    vendors: list[Vendor],
    *,
    hours: float,
    checkpoint_every: float,
    budget: str,
    deadline_in: float | None,
    payments: list[Payment] | None = None,
    jobs: list[Job] | None = None,
) -> PlanContext:
    run = Run(
        _id="run1",
        user_id="u",
        goal="train",
        status="running",
        budget_total=usd_to_micros(budget),
        budget_remaining=usd_to_micros(budget),
        job_spec=JobSpec(hours=hours, checkpoint_every=checkpoint_every),
        deadline=None if deadline_in is None else NOW + timedelta(hours=deadline_in),
        created_at=NOW,
        updated_at=NOW,
    )
    state = RunState(run=run, jobs=jobs or [], payments=payments or [], observations=[])
    return PlanContext(state=state, vendors=vendors, now=NOW, payment_overhead=usd_to_micros(FEE))


# As procure has learned the synthetic market's middle vendors: "budget" fails about once in
# 14 GPU-hours, "standard" about once in 30; the steady ones are beyond a tight budget.
BUDGET = vendor("budget", "1.25", 0.90, failures=9, gpu_hours=130.0)
STANDARD = vendor("standard", "1.45", 0.95, failures=3, gpu_hours=100.0)
PREMIUM = vendor("premium", "2.40", 0.995, successes=50, gpu_hours=200.0)


def test_short_job_whose_slack_cannot_absorb_a_failure_goes_to_the_steadier_vendor() -> None:
    """Before the fix: a deadline miss was priced at twice the money at stake, so a short job
    whose slack could not absorb one failure went to a vendor failing twice as often to save a
    few percent, and after its failure every vendor was too late."""
    # 1.17 hours of work, checkpoints every 0.195 h, the deadline 0.23 h beyond the work: a
    # failure anywhere costs a restart and up to an interval, so any failure misses it.
    tight = dict(hours=1.17, checkpoint_every=1 / 6, budget="1.94")
    action = plan_cost_aware(context([BUDGET, STANDARD, PREMIUM], deadline_in=1.395, **tight))
    assert action.action == "start_job" and action.vendor_id == "standard", action.reason
    # Without the deadline the cheaper vendor is still the better buy.
    free = plan_cost_aware(context([BUDGET, STANDARD, PREMIUM], deadline_in=None, **tight))
    assert free.vendor_id == "budget"


def _renewals_refused(ctx: PlanContext, vendor_id: str, hours: float, slice_hours: float) -> int:
    """Pay the job slice by slice as the tick would, counting renewals the guard refuses."""
    price = next(v.base_price_per_hour for v in ctx.vendors if v.vendor_id == vendor_id)
    job = Job(
        _id="j1",
        run_id="run1",
        vendor_id=vendor_id,
        status=JobStatus.running,
        expected_cost=round(price * hours),
        job_params={"hours": hours, "totalHours": hours},
        idempotency_key="k1",
        slice_hours=slice_hours,
        created_at=NOW,
        updated_at=NOW,
    )
    fee = usd_to_micros(FEE)
    payments: list[Payment] = []
    refused = 0
    paid = 0.0
    while (more := next_slice_hours(job, paid)) > 1e-9:
        quote = Quote(
            quote_id=f"q{len(payments)}",
            vendor_id=vendor_id,
            gpu_type="A100",
            hours=more,
            price_per_hour=price,
            amount=charge(price, more) + fee,
        )
        if payments:
            state = ctx.state.model_copy(update={"payments": payments, "jobs": [job]})
            now = PlanContext(state=state, vendors=ctx.vendors, now=NOW, payment_overhead=fee)
            if check_renewal(now, job, quote) is not None:
                refused += 1
        payments.append(
            Payment(
                _id=f"p{len(payments)}",
                run_id="run1",
                job_id=job.id,
                vendor_id=vendor_id,
                amount=quote.amount,
                status=PaymentStatus.completed,
                nonce=f"n{len(payments)}",
                hours=more,
                created_at=NOW,
                updated_at=NOW,
            )
        )
        paid += more
    return refused


def test_a_last_sliver_is_renewed_at_the_same_price_not_refused_as_a_rise() -> None:
    """Before the fix: the guard compared a renewal's amount per hour with the slices before it;
    a run's last checkpoint interval is often a sliver (0.94 h with a checkpoint every 0.1652 of
    it: six intervals of 0.155 h and a last one of 0.008 h), whose payment fee on 30 seconds read
    as a price rise: refused, the job stopped and a new job's start-up bought the 30 seconds (late
    by that much when the deadline was close). The price per hour is compared now."""
    ctx = context(
        [BUDGET, STANDARD, PREMIUM], hours=0.94, checkpoint_every=0.1652, budget="9",
        deadline_in=None,
    )  # fmt: skip
    for slice_hours in (2 * 0.1553, 3 * 0.1553):
        assert _renewals_refused(ctx, "standard", 0.94, slice_hours) == 0, slice_hours


def test_a_tight_budget_and_a_deadline_pay_slices_short_enough_to_recover_from_a_failure() -> None:
    """Before the fix: the miss chance ignored the budget, so a long slice paid ahead was chosen
    even where one failure left too little money to buy the rest: the run aborted, missed."""
    # 4 hours on a steady-ish vendor, checkpoints every 0.2 h, the deadline 1 h out beyond
    # the work. A failure just before the end loses the slice paid ahead and the interval since
    # the checkpoint: with $7 for $5.80 of work, only short slices leave money to redo that
    # interval (on the cheapest vendor) before the deadline; with $12 the longer slices stand.
    standard = vendor("standard", "1.45", 0.95, failures=3, gpu_hours=300.0)
    bargain = vendor("bargain", "1.00", 0.95, failures=35, gpu_hours=100.0)
    shape = dict(hours=4.0, checkpoint_every=0.05, deadline_in=5.0)
    roomy = plan_cost_aware(context([standard, bargain], budget="12", **shape))
    tight = plan_cost_aware(context([standard, bargain], budget="7", **shape))
    assert roomy.vendor_id == tight.vendor_id == "standard"
    assert roomy.slice_hours is not None and tight.slice_hours is not None
    assert tight.slice_hours < roomy.slice_hours
    # Paid for the whole job, a slice ahead lost, and the last interval redone at $1/h, plus
    # a fee a payment: within the $7.
    payments = math.ceil(4.0 / tight.slice_hours) + 1
    worst = 1.45 * 4.0 + 1.45 * tight.slice_hours * 1.1 + 1.00 * 0.2 + 0.005 * payments
    assert worst <= 7.0
