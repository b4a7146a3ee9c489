"""The planner prices each vendor at its own start-up, learned from the jobs it ran to their end
(the wall time from the payment to the end, less the work done), not at one usual figure for
all: with a deadline close, the vendor seen starting fastest gets the job whose start-up only it
still fits, a vendor seen starting slowly stops getting jobs its start-up makes late, and a
start-up never seen as short as the time left is a miss, not a chance. The simulator teaches the
planner only what the job rows it leaves show, as the tick's would."""

from __future__ import annotations

from datetime import timedelta

from procure.agent.context import (
    DEFAULT_STARTUP_HOURS,
    PlanContext,
    StartupsSeen,
    observed_startup,
    startups_seen,
)
from procure.agent.costmodel import miss_probability
from procure.agent.planner import plan_cost_aware
from procure.models import Action, Job, JobStatus, RunState, usd_to_micros
from procure.sim.bench import job_budget, run_policy
from procure.sim.engine import EPOCH, registry
from procure.sim.market import DEADLINE_TIGHT, JobCase, Market, VendorSpec, make_jobs
from procure.sim.policies import POLICIES, Policy
from test_planner_deadline_slices_and_vendors import deadline_run

PROCURE = next(p for p in POLICIES if p.name == "procure")
# Two vendors that never fail: the cheaper one takes 0.3 h from payment to a running job, the
# other 0.05 h. Deadlines fall 0.05 h + 15 % of the work after the start, so on a job under
# 1.67 h only the quick vendor's start-up fits.
SLOW = VendorSpec("slow", usd_to_micros("1.00"), 0.0, 0.99, 0.0, 0.30)
QUICK = VendorSpec("quick", usd_to_micros("1.10"), 0.0, 0.99, 0.0, 0.05)
STARTUPS = Market("startups", (SLOW, QUICK), usd_to_micros("0.005"), deadline_slack=0.15)


def _job(status: JobStatus, *, started: float | None) -> Job:
    """A job row as the tick leaves it: created when it was paid, first seen running `started`
    hours later (None: never seen running)."""
    return Job(
        _id=f"j-{status}-{started}",
        run_id="r",
        vendor_id="standard",
        status=status,
        expected_cost=1,
        job_params={"hours": 2.0, "totalHours": 2.0},
        idempotency_key=f"k-{status}-{started}",
        created_at=EPOCH,
        updated_at=EPOCH,
        started_at=None if started is None else EPOCH + timedelta(hours=started),
    )


def test_a_start_up_is_read_off_the_rows_of_jobs_seen_running() -> None:
    # Seen running 0.3 h and 0.1 h after they were paid, whatever became of them since.
    completed = _job(JobStatus.completed, started=0.3)
    failed = _job(JobStatus.failed, started=0.1)
    assert abs((observed_startup(completed) or 0) - 0.3) < 1e-9
    assert abs((observed_startup(failed) or 0) - 0.1) < 1e-9
    # Never seen running (failed in its start-up, or stopped before it ran): it teaches nothing.
    assert observed_startup(_job(JobStatus.failed, started=None)) is None
    jobs = [completed, failed, _job(JobStatus.cancelled, started=None)]
    seen = startups_seen(
        (j.vendor_id, j.created_at, j.started_at) for j in jobs if j.started_at is not None
    )
    assert list(seen) == ["standard"] and seen["standard"].count == 2
    assert abs(seen["standard"].hours - 0.4) < 1e-9
    assert abs(seen["standard"].shortest - 0.1) < 1e-9
    ctx = PlanContext(
        state=RunState(
            run=deadline_run(2.0, 0.1, 10**7, 3.0), jobs=[], payments=[], observations=[]
        ),
        vendors=list(registry(DEADLINE_TIGHT).values()),
        startups=seen,
    )
    vendors = {v.vendor_id: v for v in ctx.vendors}
    assert abs(ctx.startup_of(vendors["standard"]) - 0.2) < 1e-9  # the mean of those seen
    assert ctx.startup_of(vendors["budget"]) == DEFAULT_STARTUP_HOURS  # none seen: the usual


def _seen(hours: float, times: int) -> StartupsSeen:
    """`times` start-ups of `hours` seen at a vendor."""
    seen = StartupsSeen()
    for _ in range(times):
        seen = seen.seen(hours)
    return seen


def test_after_a_failure_the_vendor_seen_starting_fastest_gets_the_deadline_only_it_fits() -> None:
    """Before the fix: every vendor was priced at one usual start-up (0.1 h), which did not fit
    the 0.09 h left beyond the work, so budget ($1.25/h) and standard ($1.45/h, as flaky as
    budget here) looked equally likely to miss and the cheaper one got the job, though standard
    had been seen starting in 0.08 h (it fits) and budget in 0.1 h (it misses)."""
    # What the agent has learned: failures per GPU-hour run, and start-ups seen.
    learned = {"bargain": (40, 110.0), "discount": (12, 60.0), "budget": (5, 60.0)}
    learned["standard"] = (8, 80.0)
    seen = {
        "bargain": _seen(0.1, 20),
        "discount": _seen(0.15, 10),
        "budget": _seen(0.1, 20),
        "standard": _seen(0.08, 6),
        "steady": _seen(0.05, 2),
    }
    now = EPOCH + timedelta(hours=1.0)
    vendors = [
        v.model_copy(
            update={
                "failures": learned[v.vendor_id][0],
                "gpu_hours": learned[v.vendor_id][1],
                "cooldown_until": now + timedelta(minutes=5) if v.vendor_id == "discount" else None,
            }
        )
        if v.vendor_id in learned
        else v
        for v in registry(DEADLINE_TIGHT).values()
    ]
    # A 1.5 h job due at 1.69 h: discount ran it to 60 % and failed at 1.0 h (it cools down);
    # 0.6 h of work is left, 0.69 h to go, and $0.95: steady and premium cannot be afforded.
    run = deadline_run(1.5, 0.1, usd_to_micros("0.95"), 1.69)
    failed = Job(
        _id="j1",
        run_id=run.id,
        vendor_id="discount",
        status=JobStatus.failed,
        expected_cost=1,
        job_params={"hours": 1.5, "totalHours": 1.5},
        idempotency_key="k1",
        checkpoint_url="sim://j1/ckpt",
        checkpoint_progress=0.6,
        created_at=EPOCH,
        updated_at=now,
    )
    ctx = PlanContext(
        state=RunState(run=run, jobs=[failed], payments=[], observations=[]),
        vendors=vendors,
        errors_by_vendor={"discount": 1},
        now=now,
        payment_overhead=DEADLINE_TIGHT.payment_fee,
        startups=seen,
    )
    action = plan_cost_aware(ctx)
    assert action.action == "start_job", action.reason
    assert action.vendor_id == "standard", action.reason


def test_a_start_up_that_never_came_as_short_as_the_time_left_is_priced_as_a_miss() -> None:
    """Before the fix: a start-up that did not fit the time left beyond the work was read as a
    rough figure that a shorter one might beat (a 0.09 h gap against 0.1 h: a 90 % chance it
    fits), even at a vendor seen starting in exactly 0.1 h every time; the planner then bet a
    deadline on it."""

    def p_miss(shortest: float | None) -> float:
        return miss_probability(
            0.05,
            0.6,
            0.1,
            0.69,
            interval_hours=0.15,
            restart_hours=0.1,
            shortest_startup=shortest,
        )

    assert p_miss(0.1) == 1.0  # every start-up seen there took 0.1 h: it will not fit
    assert 0.1 < p_miss(None) < 0.2  # none seen: the usual 0.1 h is a guess, 0.09 h may do
    assert p_miss(0.06) < 0.4  # seen from 0.06 h up: a 0.09 h one is no surprise


def _short_jobs(count: int) -> list[JobCase]:
    cases = [c for c in make_jobs(STARTUPS, 300, seed=3) if c.hours < 1.6][:count]
    assert len(cases) == count
    return cases


def test_a_vendor_seen_starting_too_slowly_for_the_deadlines_stops_getting_the_jobs() -> None:
    """Before the fix: every vendor was priced at the usual 0.1 h start-up, so the cheaper
    vendor looked as if it made every deadline, got every job, and made none of them late by
    its 0.3 h start-up: ten jobs, ten misses."""
    cases = _short_jobs(10)
    rows = run_policy(PROCURE, STARTUPS, cases, [job_budget(STARTUPS, c) for c in cases])
    assert all(o.completed for o in rows)
    missed = [o.job for o in rows if o.missed_deadline]
    # The first job goes to the cheaper vendor (nothing seen yet) and is late; it shows the
    # vendor's start-up, and from then on the quick one gets the jobs.
    assert missed == [cases[0].index], missed


def test_the_simulated_planner_knows_only_the_start_ups_its_jobs_showed() -> None:
    """The simulator must not hand the planner the market's start-ups: before any job ended it
    sees the usual figure for every vendor, and afterwards only what the ended jobs' rows show
    (the slow vendor's 0.3 h after its first job; nothing of the quick one until it ran)."""
    seen: list[dict[str, float]] = []

    async def watching(ctx: PlanContext) -> Action:
        seen.append({v.vendor_id: ctx.startup_of(v) for v in ctx.vendors})
        return await PROCURE.planner(ctx)

    cases = _short_jobs(3)
    policy = Policy("watching", watching, resume=True, reconsider=PROCURE.reconsider)
    run_policy(policy, STARTUPS, cases, [job_budget(STARTUPS, c) for c in cases])
    usual = {"slow": DEFAULT_STARTUP_HOURS, "quick": DEFAULT_STARTUP_HOURS}
    assert seen[0] == usual
    assert abs(seen[1]["slow"] - 0.3) < 1e-9 and seen[1]["quick"] == DEFAULT_STARTUP_HOURS
    assert abs(seen[-1]["quick"] - 0.05) < 1e-9 and abs(seen[-1]["slow"] - 0.3) < 1e-9
