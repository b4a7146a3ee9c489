"""One job on a spot trace under the agent's own decisions: planner, guard and fallback
(`agent.decide`), `check_quote`, `check_renewal` and `planner.reconsider`, against two vendors
that behave like the trace.

The spot vendor has capacity in the ticks the trace says; in the others it refuses to start a
job, and a job running there is preempted at the tick (progress kept: checkpoints are
continuous). The on-demand vendor always has capacity. Both bill per step: at every tick the
job's next step is quoted and paid, which is the tick's renewal point. A launch pays the restart
overhead as start-up time. What the agent knows of a vendor is what the store would: prices,
the registry's reliability, and failures and GPU-hours learned in this run; a vendor that
answered "no capacity" is cooling down until the next tick, as after a refused quote.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from procure.agent.context import PlanContext
from procure.agent.decide import decide, run_sync
from procure.agent.guard import check_quote, check_renewal
from procure.agent.planner import Planner, heuristic_planner, reconsider
from procure.models import (
    Job,
    JobSpec,
    JobStatus,
    Payment,
    Quote,
    Run,
    RunState,
    RunStatus,
    Vendor,
    usd_to_micros,
)
from procure.sim.engine import completed_payment
from procure.sim.market import charge
from procure.sim.traces import EPS, Mode, Setting, hold, preempt_if_gone
from procure.sim.traces import Job as Account

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
GPU = "V100"
SPOT, ON_DEMAND = "spot", "on-demand"
CHECKPOINT_EVERY = 1e-4  # of the job: continuous, as the setting has it
SPOT_RELIABILITY = 0.9  # the registry's word: a preemption every ~10 hours
ON_DEMAND_RELIABILITY = 0.9999
BUDGET_FACTOR = 2.0  # times the on-demand-only cost: the budget never binds
MAX_DECISIONS_PER_TICK = 3  # a refused start is followed by another decision in the same tick


def registry(setting: Setting) -> dict[str, Vendor]:
    def vendor(vid: str, price: float, score: float) -> Vendor:
        return Vendor(
            vendor_id=vid,
            name=vid.title(),
            endpoint=f"sim://{vid}",
            base_price_per_hour=usd_to_micros(str(price)),
            reliability_score=score,
            supported_gpu_types=[GPU],
            created_at=EPOCH,
            updated_at=EPOCH,
        )

    return {
        SPOT: vendor(SPOT, setting.spot_price, SPOT_RELIABILITY),
        ON_DEMAND: vendor(ON_DEMAND, setting.on_demand_price, ON_DEMAND_RELIABILITY),
    }


def _at(hours: float) -> datetime:
    return EPOCH + timedelta(hours=hours)


@dataclass
class _Agent:
    """What the store would hold for the run, and the helpers the tick's steps need."""

    setting: Setting
    run: Run
    vendors: dict[str, Vendor]
    jobs: list[Job] = field(default_factory=list)
    payments: list[Payment] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    def context(self, hours: float) -> PlanContext:
        state = RunState(run=self.run, jobs=self.jobs, payments=self.payments, observations=[])
        return PlanContext(
            state=state,
            vendors=list(self.vendors.values()),
            errors_by_vendor=dict(self.errors),
            now=_at(hours),
            payment_overhead=0,
            startup_hours=self.setting.overhead_hours,
        )

    def quote(self, vendor_id: str, hours: float) -> Quote:
        price = self.vendors[vendor_id].base_price_per_hour
        return Quote(
            quote_id=f"q{next(self.ids)}",
            vendor_id=vendor_id,
            gpu_type=GPU,
            hours=hours,
            price_per_hour=price,
            amount=max(charge(price, hours), 1),
        )

    def pay(self, job: Job, quote: Quote, at: float) -> None:
        self.payments.append(completed_payment(f"p{next(self.ids)}", job, quote, at))

    def set_capacity(self, available: bool, now: float, gap: float) -> None:
        """The spot vendor as the agent sees it at this tick: no capacity cools it down; with
        capacity, its last cool-down stays on record (as a store keeps it), in the past."""
        if not available:
            until = _at(now + gap)
            self.vendors[SPOT] = self.vendors[SPOT].model_copy(update={"cooldown_until": until})

    def end_job(
        self, status: JobStatus, done: float, held: float, at: float, *, failed: bool
    ) -> None:
        """The current job ends at `at` with its progress saved; a preemption is a failure."""
        job = self.jobs[-1]
        self.jobs[-1] = job.model_copy(
            update={
                "status": status,
                "updated_at": _at(at),
                "checkpoint_url": f"sim://{job.id}/ckpt",
                "checkpoint_progress": done / self.setting.task_hours,
            }
        )
        v = self.vendors[job.vendor_id]
        update: dict[str, object] = {"gpu_hours": v.gpu_hours + held}
        if failed:
            update["failures"] = v.failures + 1
            self.errors[job.vendor_id] = self.errors.get(job.vendor_id, 0) + 1
        elif status == JobStatus.completed:
            update["successes"] = v.successes + 1
        self.vendors[job.vendor_id] = v.model_copy(update=update)

    def checkpoint(self, done: float) -> None:
        """Continuous checkpoints: every poll saves the job's progress."""
        self.jobs[-1] = self.jobs[-1].model_copy(
            update={
                "checkpoint_url": f"sim://{self.jobs[-1].id}/ckpt",
                "checkpoint_progress": done / self.setting.task_hours,
            }
        )


@dataclass(frozen=True)
class Played:
    account: Account  # the job as the market saw it: progress, clock, finish
    cost: float  # dollars, all payments
    payments: int
    decisions: int


def _new_run(setting: Setting) -> Run:
    od = setting.on_demand_price * (setting.task_hours + setting.overhead_hours)
    budget = usd_to_micros(f"{od * BUDGET_FACTOR:.2f}")
    return Run(
        _id="spot-run",
        user_id="sim",
        goal="spot trace job",
        status=RunStatus.running,
        budget_total=budget,
        budget_remaining=budget,
        job_spec=JobSpec(gpu_type=GPU, hours=setting.task_hours, checkpoint_every=CHECKPOINT_EVERY),
        deadline=_at(setting.deadline_hours),
        created_at=EPOCH,
        updated_at=EPOCH,
    )


def _step_hours(acct: Account, setting: Setting, gap: float, launching: bool) -> float:
    """What one step will hold: a full step, or less if the job finishes in it."""
    overhead = setting.overhead_hours if launching else acct.overhead_left
    return min(gap, overhead + acct.work_left(setting))


def play_planner(
    available: Sequence[bool], gap: float, setting: Setting, planner: Planner = heuristic_planner
) -> Played:
    """Run one job from tick 0 of `available` under `planner` until it finishes or aborts."""
    agent = _Agent(setting, _new_run(setting), registry(setting))
    acct = Account()
    held = 0.0  # hours held by the current job
    decisions = 0
    tick = 0
    modes = {SPOT: Mode.SPOT, ON_DEMAND: Mode.ON_DEMAND}
    while acct.finished is None:
        now = tick * gap
        here = tick < len(available) and available[tick]
        agent.set_capacity(here, now, gap)
        if preempt_if_gone(acct, here):
            agent.end_job(JobStatus.failed, acct.done, held, now, failed=True)
        running = acct.mode != Mode.NONE
        if running:
            agent.checkpoint(acct.done)
            ctx = agent.context(now)
            job = agent.jobs[-1]
            decisions += 1
            more = agent.quote(job.vendor_id, _step_hours(acct, setting, gap, launching=False))
            if reconsider(ctx, job, acct.done / setting.task_hours) is not None or (
                check_renewal(ctx, job, more) is not None
            ):
                agent.end_job(JobStatus.failed, acct.done, held, now, failed=False)
                acct.mode, acct.overhead_left, running = Mode.NONE, 0.0, False
            else:
                agent.pay(job, more, now)
        mode = acct.mode
        for _ in range(0 if running else MAX_DECISIONS_PER_TICK):
            ctx = agent.context(now)
            decisions += 1
            action = run_sync(decide(planner, ctx)).action
            if action.action == "abort":
                return Played(acct, _paid(agent), len(agent.payments), decisions)
            if action.action == "wait" or action.vendor_id not in modes:
                break
            vendor_id = action.vendor_id
            if vendor_id == SPOT and not here:  # no capacity: refused, cooled down, ask again
                agent.errors[SPOT] = agent.errors.get(SPOT, 0) + 1
                agent.set_capacity(False, now, gap)
                continue
            quote = agent.quote(vendor_id, _step_hours(acct, setting, gap, launching=True))
            if check_quote(ctx, action, quote) is not None:
                break
            job = Job(
                _id=f"j{next(agent.ids)}",
                run_id=agent.run.id,
                vendor_id=vendor_id,
                status=JobStatus.running,
                expected_cost=round(
                    agent.vendors[vendor_id].base_price_per_hour * ctx.remaining_hours
                ),
                job_params={"hours": ctx.remaining_hours, "totalHours": setting.task_hours},
                idempotency_key=f"k{next(agent.ids)}",
                start_progress=acct.done / setting.task_hours,
                checkpoint_progress=acct.done / setting.task_hours,
                slice_hours=action.slice_hours,
                created_at=_at(now),
                updated_at=_at(now),
            )
            agent.jobs.append(job)
            agent.pay(job, quote, now)
            mode, held = modes[vendor_id], 0.0
            break
        before = acct.hours
        hold(acct, mode, setting, gap)
        held += acct.hours - before if mode != Mode.NONE else 0.0
        if acct.finished is not None:
            agent.end_job(JobStatus.completed, acct.done, held, acct.hours, failed=False)
        tick += 1
        if tick * gap > 10 * setting.deadline_hours + EPS:  # a planner that never finishes
            break
    return Played(acct, _paid(agent), len(agent.payments), decisions)


def _paid(agent: _Agent) -> float:
    return sum(p.amount for p in agent.payments) / 1e6
