"""Discrete-event simulation of one job under one policy, through the agent's own decisions.

At every point where the tick would plan, the simulator builds the `PlanContext` the tick would
build (run, jobs, payments, vendors with their learned outcomes, errors this run, the clock) and
takes the decision the tick takes (`agent.decide`: planner, guard, fallback); quotes and slice
renewals pass the tick's own checks (`check_quote`, `check_renewal`) against the budget, and
renewals follow the tick's rule (`agent.slices`). Between decisions the market plays out: start-up
delays, capacity refusals, failures at their drawn times, checkpoints, paid time running out.
The agent's rules hold whatever the policy asks: a job that ends before the work is done leaves
the run at the checkpoint it reached, and the next job resumes from there (only the job that
reaches the end completes the run); failures keep coming for as long as a job runs, horizon or
not (the horizon only stops new jobs). Vendors' learned outcomes (successes, failures,
GPU-hours) carry over from job to job, as the store keeps them, and so do the start-ups seen at
each vendor: read off each job seen running by `context.observed_startup`, from the job's row
as the tick leaves it (created at the payment, `started_at` when its work started, as the
tick's first running poll records it; one that failed in its start-up was never seen running),
never from the market's own figures.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from procure.agent.context import PlanContext, StartupsSeen, observed_startup
from procure.agent.decide import decide, run_sync
from procure.agent.guard import check_quote, check_renewal
from procure.agent.slices import (
    RENEW_FRACTION,
    job_shape,
    next_slice_hours,
    paid_hours,
    paid_until,
    renewal_due,
)
from procure.models import (
    Action,
    Job,
    JobSpec,
    JobStatus,
    Payment,
    PaymentStatus,
    Quote,
    Run,
    RunState,
    RunStatus,
    Vendor,
)
from procure.sim.market import JobCase, Market, VendorSpec, charge, next_failure
from procure.sim.policies import Policy

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
RETRY_HOURS = 0.02  # after a refused quote or start, the next tick comes this much later
WAIT_HOURS = 0.05  # a planner that waits with nothing cooling down is asked again after this
EPS = 1e-9
GPU = "A100"


@dataclass(frozen=True)
class Outcome:
    policy: str
    job: int
    completed: bool
    cost: int  # micro-USD paid in all
    budget: int
    finish_hours: float | None
    has_deadline: bool
    missed_deadline: bool
    payments: int
    failures: int
    max_committed: int  # the most ever paid at once, to check against the budget
    progress: float = 0.0  # the checkpoint the run ended at (1.0: completed)
    # Micro-USD the exact optimum expects to pay to finish from `progress` (0 when completed),
    # and from the start: filled in by the benchmark, which charges unfinished runs with it.
    owed: float = 0.0
    expected: float = 0.0


def registry(market: Market) -> dict[str, Vendor]:
    """What the agent knows of the market at first: prices and advertised reliability."""
    return {
        v.vendor_id: Vendor(
            vendor_id=v.vendor_id,
            name=v.vendor_id.title(),
            endpoint=f"sim://{v.vendor_id}",
            base_price_per_hour=v.price_per_hour,
            reliability_score=v.advertised,
            supported_gpu_types=[GPU],
            created_at=EPOCH,
            updated_at=EPOCH,
        )
        for v in market.vendors
    }


def _at(hours: float) -> datetime:
    return EPOCH + timedelta(hours=hours)


def completed_payment(payment_id: str, job: Job, quote: Quote, at: float) -> Payment:
    """A simulated payment for `quote`, settled at simulated hour `at` (shared by the markets)."""
    return Payment(
        _id=payment_id,
        run_id=job.run_id,
        job_id=job.id,
        vendor_id=job.vendor_id,
        amount=quote.amount,
        status=PaymentStatus.completed,
        nonce=payment_id,
        hours=quote.hours,
        created_at=_at(at),
        updated_at=_at(at),
    )


@dataclass
class _Sim:
    policy: Policy
    market: Market
    case: JobCase
    run: Run
    vendors: dict[str, Vendor]
    jobs: list[Job]
    payments: list[Payment]
    errors: dict[str, int]
    ids: itertools.count  # type: ignore[type-arg]
    startups: dict[str, StartupsSeen]
    failures: int = 0

    def context(self, hours: float) -> PlanContext:
        state = RunState(run=self.run, jobs=self.jobs, payments=self.payments, observations=[])
        return PlanContext(
            state=state,
            vendors=list(self.vendors.values()),
            errors_by_vendor=dict(self.errors),
            now=_at(hours),
            payment_overhead=self.market.payment_fee,
            startups=dict(self.startups),
        )

    def quote(self, spec: VendorSpec, hours: float) -> Quote:
        return Quote(
            quote_id=f"q{next(self.ids)}",
            vendor_id=spec.vendor_id,
            gpu_type=GPU,
            hours=hours,
            price_per_hour=spec.price_per_hour,
            amount=charge(spec.price_per_hour, hours) + self.market.payment_fee,
        )

    def pay(self, job: Job, quote: Quote, at: float) -> None:
        self.payments.append(completed_payment(f"p{next(self.ids)}", job, quote, at))

    def paid(self, job: Job) -> float:
        return paid_hours(job, self.payments)

    def error(self, vendor_id: str) -> None:
        self.errors[vendor_id] = self.errors.get(vendor_id, 0) + 1

    def cool(self, vendor_id: str, now: float) -> None:
        until = _at(now + self.market.cooldown_hours)
        self.vendors[vendor_id] = self.vendors[vendor_id].model_copy(
            update={"cooldown_until": until}
        )

    def ended(self, job: Job) -> None:
        """Record `job`, ended, and learn its vendor's start-up from its row (if seen running)."""
        self.jobs[-1] = job
        seen = observed_startup(job)
        if seen is not None:
            before = self.startups.get(job.vendor_id, StartupsSeen())
            self.startups[job.vendor_id] = before.seen(seen)

    def learn(self, vendor_id: str, *, success: bool, gpu_hours: float, now: float) -> None:
        v = self.vendors[vendor_id]
        update: dict[str, object] = {"gpu_hours": v.gpu_hours + gpu_hours}
        if success:
            update["successes"] = v.successes + 1
        else:
            update["failures"] = v.failures + 1
            update["cooldown_until"] = _at(now + self.market.cooldown_hours)
        self.vendors[vendor_id] = v.model_copy(update=update)


def simulate(
    policy: Policy,
    market: Market,
    case: JobCase,
    budget: int,
    learned: dict[str, Vendor],
    startups: dict[str, StartupsSeen] | None = None,
) -> Outcome:
    """Run `case` to its end under `policy`; `learned` (vendor outcomes) and `startups` (the
    start-ups seen per vendor; none if not given) are updated in place."""
    run = Run(
        _id=f"sim-{case.index}",
        user_id="sim",
        goal="simulated job",
        status=RunStatus.running,
        budget_total=budget,
        budget_remaining=budget,
        job_spec=JobSpec(gpu_type=GPU, hours=case.hours, checkpoint_every=case.checkpoint_every),
        deadline=None if case.deadline_hours is None else _at(case.deadline_hours),
        created_at=EPOCH,
        updated_at=EPOCH,
    )
    sim = _Sim(
        policy=policy,
        market=market,
        case=case,
        run=run,
        vendors={k: v.model_copy(update={"cooldown_until": None}) for k, v in learned.items()},
        jobs=[],
        payments=[],
        errors={},
        ids=itertools.count(),
        startups={} if startups is None else startups,
    )
    finish = _play(sim)
    progress = 1.0 if finish is not None else sim.context(0.0).resume_progress
    for vendor_id, vendor in sim.vendors.items():
        learned[vendor_id] = vendor.model_copy(update={"cooldown_until": None})
    cost = sum(p.amount for p in sim.payments)
    late = case.deadline_hours is not None and (
        finish is None or finish > case.deadline_hours + EPS
    )
    return Outcome(
        policy=policy.name,
        job=case.index,
        completed=finish is not None,
        cost=cost,
        budget=budget,
        finish_hours=finish,
        has_deadline=case.deadline_hours is not None,
        missed_deadline=late,
        payments=len(sim.payments),
        failures=sim.failures,
        max_committed=cost,  # payments only ever add up; the last total is the largest
        progress=progress,
    )


def _play(sim: _Sim) -> float | None:
    """The decision loop; returns the hour the job completed, or None if it never did."""
    t = 0.0
    specs = {v.vendor_id: v for v in sim.market.vendors}
    while t <= sim.case.horizon_hours:
        ctx = sim.context(t)
        action = run_sync(decide(sim.policy.planner, ctx)).action
        if action.action == "abort":
            return None
        if action.action == "wait":
            ends = [
                (v.cooldown_until - EPOCH).total_seconds() / 3600
                for v in sim.vendors.values()
                if v.cooldown_until is not None and ctx.cooling_down(v)
            ]
            t = min(ends) if ends else t + WAIT_HOURS
            continue
        assert action.vendor_id is not None  # the guard saw to it
        spec = specs[action.vendor_id]
        if not sim.case.has_capacity(spec, t):
            # The tick records a vendor error and cools the vendor down (no failure counted).
            sim.error(spec.vendor_id)
            sim.cool(spec.vendor_id, t)
            t += RETRY_HOURS
            continue
        done, t = _run_job(sim, ctx, action, spec, t)
        if done:
            return t
    return None


def _run_job(
    sim: _Sim, ctx: PlanContext, action: Action, spec: VendorSpec, t: float
) -> tuple[bool, float]:
    """Start a job on `spec` at hour `t` and play it out: (completed, hour it ended)."""
    hours, slice_hours = job_shape(ctx.remaining_hours, action.hours, action.slice_hours)
    first = slice_hours or hours
    quote = sim.quote(spec, first)
    if check_quote(ctx, action, quote) is not None:
        sim.error(spec.vendor_id)
        return False, t + RETRY_HOURS
    resume = ctx.resume_from if sim.policy.resume else None
    start = resume.checkpoint_progress if resume else 0.0
    job = Job(
        _id=f"j{next(sim.ids)}",
        run_id=sim.run.id,
        vendor_id=spec.vendor_id,
        status=JobStatus.running,
        expected_cost=round(spec.price_per_hour * hours),
        job_params={"hours": hours, "totalHours": sim.case.hours},
        idempotency_key=f"k{next(sim.ids)}",
        start_progress=start,
        checkpoint_url=resume.checkpoint_url if resume else None,
        checkpoint_progress=start,
        slice_hours=slice_hours,
        created_at=_at(t),
        updated_at=_at(t),
    )
    sim.jobs.append(job)
    sim.pay(job, quote, t)
    total = sim.case.hours
    work_start = t + spec.startup_hours
    fails = next_failure(sim.case, spec.vendor_id, t)
    paid = first
    renewing = slice_hours is not None
    while True:
        renew_at = None
        if renewing and next_slice_hours(job, paid) > EPS:
            assert slice_hours is not None
            renew_at = max(paid - RENEW_FRACTION * slice_hours, 0.0)
        stop = paid if renew_at is None else renew_at  # work hours at the next event
        if fails <= work_start + stop:
            _failed(sim, job, fails, work_start, start, total)
            return False, fails
        if renew_at is None:
            end = work_start + paid
            if paid >= hours - EPS and start + paid / total >= 1 - EPS:
                done = {
                    "status": JobStatus.completed,
                    "progress": 1.0,
                    "completed_at": _at(end),
                    "started_at": _at(work_start),
                }
                sim.ended(job.model_copy(update=done))
                sim.learn(spec.vendor_id, success=True, gpu_hours=paid, now=end)
                return True, end
            if paid >= hours - EPS:  # a job shorter than the work left: the run goes on
                _stopped(sim, job, start + paid / total, paid, work_start, end)
                return False, end
            if slice_hours is not None and _renew(sim, spec, job, paid, end, stopping=True):
                paid = sim.paid(job)  # changed its mind at the last moment: carry on
                renewing = True
                continue
            _stopped(sim, job, start + paid / total, paid, work_start, end)
            return False, end
        now = work_start + renew_at
        assert renewal_due(job, paid, start + renew_at / total + EPS)
        renewing = _renew(sim, spec, job, paid, now, stopping=False)
        paid = sim.paid(job)


def _renew(
    sim: _Sim, spec: VendorSpec, job: Job, paid: float, now: float, *, stopping: bool
) -> bool:
    """The tick at a renewal point: pay the next slice unless the planner would rather move on,
    or the budget cannot cover it. False: let the job run out its paid time."""
    ctx = sim.context(now)
    stop = sim.policy.reconsider
    if stop is not None and stop(ctx, job, paid_until(job, paid)) is not None:
        return False
    more = sim.quote(spec, next_slice_hours(job, paid))
    if check_renewal(ctx, job, more) is not None:
        return False
    sim.pay(job, more, now)
    return True


def _checkpoint(sim: _Sim, progress: float) -> float:
    step = sim.case.checkpoint_every
    return min(math.floor(progress / step + EPS) * step, 1.0)


def _failed(sim: _Sim, job: Job, at: float, work_start: float, start: float, total: float) -> None:
    worked = max(0.0, at - work_start)
    saved = max(_checkpoint(sim, start + worked / total), start)
    update: dict[str, object] = {"status": JobStatus.failed}
    if sim.policy.resume and saved > start:
        update |= {"checkpoint_url": f"sim://{job.id}/ckpt", "checkpoint_progress": saved}
    if at > work_start:  # it had been seen running, as a tick's poll would have seen it
        update["started_at"] = _at(work_start)
    sim.ended(job.model_copy(update=update))
    sim.learn(job.vendor_id, success=False, gpu_hours=worked, now=at)
    sim.error(job.vendor_id)  # the tick's failure observation counts against the vendor
    sim.failures += 1


def _stopped(
    sim: _Sim, job: Job, progress: float, worked: float, work_start: float, at: float
) -> None:
    """Paid time ran out at hour `at` (the agent moved on, or the budget would not stretch to
    another slice): not the vendor's fault; the checkpoint it reached stands, and the job ends
    `cancelled`, as the tick's `stop_job` leaves it."""
    saved = max(_checkpoint(sim, progress), job.start_progress)
    update: dict[str, object] = {
        "status": JobStatus.cancelled,
        "progress": min(progress, 1.0),
        "completed_at": _at(at),
        "started_at": _at(work_start),
    }
    if sim.policy.resume and saved > job.start_progress:
        update |= {"checkpoint_url": f"sim://{job.id}/ckpt", "checkpoint_progress": saved}
    sim.ended(job.model_copy(update=update))
    v = sim.vendors[job.vendor_id]
    sim.vendors[job.vendor_id] = v.model_copy(update={"gpu_hours": v.gpu_hours + worked})
