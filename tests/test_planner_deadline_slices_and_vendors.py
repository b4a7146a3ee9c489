"""Short jobs with a deadline on the planner benchmark's deadline-tight market (cheap vendors
flaky, dear ones steady; the agent sees the registry's advertised reliability and what it has
learned). With a tight budget (1.5 x the expected cost) a job is never prepaid beyond one
checkpoint interval: slices of several (0.3-0.6 h of a 1-2 h job) lost at a failure left too
little money to finish in time on a steady vendor. After a failure that leaves time for the
work but less than the usual start-up, the planner bets on the steadiest affordable vendor, not
the cheapest flaky one (a short start-up may still make it; a failure there surely misses)."""

from __future__ import annotations

from datetime import datetime, timedelta

from procure.agent.context import PlanContext
from procure.agent.planner import plan_cost_aware
from procure.models import Job, JobSpec, JobStatus, Run, RunState, RunStatus, Vendor
from procure.sim.bench import job_budget
from procure.sim.engine import EPOCH, GPU, registry
from procure.sim.market import DEADLINE_TIGHT, make_jobs

MARKET = DEADLINE_TIGHT


def deadline_run(hours: float, every: float, budget: int, deadline_hours: float) -> Run:
    """A running run on the simulated market's GPU, due `deadline_hours` after its start."""
    return Run(
        _id="r",
        user_id="u",
        goal="train",
        status=RunStatus.running,
        budget_total=budget,
        budget_remaining=budget,
        job_spec=JobSpec(gpu_type=GPU, hours=hours, checkpoint_every=every),
        deadline=EPOCH + timedelta(hours=deadline_hours),
        created_at=EPOCH,
        updated_at=EPOCH,
    )


def _context(run: Run, vendors: list[Vendor], now: datetime, jobs: list[Job]) -> PlanContext:
    failed = {j.vendor_id: 1 for j in jobs if j.status == JobStatus.failed}
    return PlanContext(
        state=RunState(run=run, jobs=jobs, payments=[], observations=[]),
        vendors=vendors,
        errors_by_vendor={k: v for k, v in failed.items() if k is not None},
        now=now,
        payment_overhead=MARKET.payment_fee,
    )


def test_a_short_deadline_job_is_paid_one_checkpoint_interval_at_a_time() -> None:
    # The benchmark's short jobs (0.5 to 2.5 GPU-hours, due 15 % after the work), each with its
    # budget of 1.5 x the optimum's expected cost.
    cases = [c for c in make_jobs(MARKET, 300, seed=9) if c.hours <= 2.5][:20]
    assert len(cases) == 20
    for case in cases:
        assert case.deadline_hours is not None
        run = deadline_run(
            case.hours, case.checkpoint_every, job_budget(MARKET, case), case.deadline_hours
        )
        action = plan_cost_aware(_context(run, list(registry(MARKET).values()), EPOCH, []))
        assert action.action == "start_job", action.reason
        paid = action.slice_hours or case.hours
        interval = case.hours * case.checkpoint_every
        assert paid <= interval + 1e-9, (
            f"job {case.index} ({case.hours}h, checkpoint every {interval:.3f}h) prepaid "
            f"{paid:.3f}h on {action.vendor_id} at once"
        )


def test_after_a_failure_with_less_slack_than_a_start_up_the_steadiest_affordable_vendor() -> None:
    # What the agent has learned: the cheap vendors fail often (as they do on this market).
    learned = {"bargain": (40, 110.0), "discount": (12, 60.0), "budget": (5, 60.0)}
    vendors = [
        v.model_copy(
            update={"failures": learned[v.vendor_id][0], "gpu_hours": learned[v.vendor_id][1]}
        )
        if v.vendor_id in learned
        else v
        for v in registry(MARKET).values()
    ]
    # A 1.5 h job due at 1.72 h: standard ran it to its checkpoint at 60 % and failed at 1.05 h,
    # and cools down; 0.6 h of work is left with 0.67 h to go (a usual start-up is 0.1 h).
    run = deadline_run(1.5, 0.1, 3_000_000, 1.72)
    failed = Job(
        _id="j1",
        run_id=run.id,
        vendor_id="standard",
        status=JobStatus.failed,
        expected_cost=2_175_000,
        job_params={"hours": 1.5, "totalHours": 1.5},
        idempotency_key="k1",
        start_progress=0.0,
        checkpoint_url="sim://j1/ckpt",
        checkpoint_progress=0.6,
        created_at=EPOCH,
        updated_at=EPOCH + timedelta(hours=1.05),
    )
    now = EPOCH + timedelta(hours=1.05)
    vendors = [
        v.model_copy(update={"cooldown_until": now + timedelta(minutes=5)})
        if v.vendor_id == "standard"
        else v
        for v in vendors
    ]
    ctx = _context(run, vendors, now, [failed])
    assert abs(ctx.remaining_hours - 0.6) < 1e-9 and ctx.hours_left is not None
    assert ctx.remaining_hours < ctx.hours_left < ctx.remaining_hours + ctx.startup_hours
    action = plan_cost_aware(ctx)
    assert action.action == "start_job", action.reason
    # Steady ($1.90/h) or premium ($2.40/h) fit the $3 left; bargain ($1.00/h) fails about
    # every 3 hours.
    assert action.vendor_id in {"steady", "premium"}, action.reason
