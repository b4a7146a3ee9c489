"""The deterministic planners.

- `stub`: the seeds' rule: the cheapest vendor that has not failed in this run, paid up front.
- `heuristic` (the default): the vendor and payment slice with the lowest expected cost to
  completion: price, the vendor's learned failure hazard, the work a failure loses since the
  last checkpoint, unused paid time, payment overhead, and, when the run has a deadline, the
  risk of missing it. Its reason names the figures it compared.

Both are pure functions of the context (no clock, no randomness): the same state gives the same
action, which the market simulator relies on to replay the tick's decisions.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal

from procure.agent import deadline as slack_rule
from procure.agent.context import PlanContext, hazard, reliability
from procure.agent.costmodel import (
    Estimate,
    Terms,
    best_long_run_rate,
    estimate,
    intervals,
    miss_probability,
    slice_options,
)
from procure.agent.slices import RENEW_FRACTION
from procure.models import MICROS_PER_USD, Action, Job, Vendor, format_usd

Planner = Callable[[PlanContext], Awaitable[Action]]
Reconsider = Callable[[PlanContext, Job, float], str | None]

# Stub: each failure or error this run halves a vendor's chance in the planner's eyes.
RUN_FAILURE_PENALTY = 0.5
# Moving a running job to another vendor must save this share of the expected cost: with a
# deadline, whose risk of a miss is a coarse estimate that jumps as slack is spent; without
# one, where the scores are money alone and already charge the move (a payment, and a start-up
# exposed to failure), a smaller share, so that a job put on a dearer stand-in while a cheaper
# vendor cooled down goes back to it at the next checkpoint instead of staying for hours.
SWITCH_MARGIN = 0.02
SWITCH_MARGIN_NO_DEADLINE = 0.005
# Missing a deadline is priced at this many times the money still at stake. At 2 a short job
# whose slack cannot absorb one failure went to a vendor failing twice as often to save a few
# percent; 6 did best of the values tried (2 to 40) on the synthetic deadline-tight market (1,000
# jobs, seeds 7-9: misses 52 -> 32 in all at about 3 % more money; more only spent more).
MISS_PENALTY = 6.0


@dataclass(frozen=True)
class Option:
    vendor: Vendor
    cost: int
    p_success: float

    @property
    def expected_cost(self) -> float:
        return self.cost / max(self.p_success, 1e-6)


def _options(ctx: PlanContext) -> tuple[list[Option], list[str]]:
    spec = ctx.state.run.job_spec
    options, notes = [], []
    for vendor in ctx.vendors:
        if spec.gpu_type not in vendor.supported_gpu_types:
            notes.append(f"{vendor.vendor_id} lacks {spec.gpu_type}")
            continue
        p = reliability(vendor) * RUN_FAILURE_PENALTY ** ctx.failures_in_run(vendor.vendor_id)
        cost = round(vendor.base_price_per_hour * ctx.remaining_hours)
        options.append(Option(vendor, cost, p))
    return options, notes


def _no_vendor(notes: list[str]) -> Action:
    # With no vendor registered at all there is nothing to list: say what to do instead.
    why = "; ".join(notes) or "no vendor is registered (`procure vendors seed`, PUT /api/vendors)"
    return Action(action="abort", reason="No vendor offers what the job needs: " + why)


def _unaffordable(ctx: PlanContext, cheapest: Vendor, cost: int) -> Action:
    """`cost`: what was compared with the budget left, and found above it."""
    shown_cost, shown_left = _apart(cost, ctx.available)
    return Action(
        action="abort",
        reason=(
            f"No vendor is affordable: the cheapest, {cheapest.vendor_id}, costs "
            f"{shown_cost} and {shown_left} is left"
        ),
    )


def _apart(a: int, b: int) -> tuple[str, str]:
    """Micro-USD `a` and `b` in dollars, to the cent unless that shows two different amounts
    alike (a cost a fraction of a cent above what is left read "costs $24.47 and $24.47 is
    left"): then with as many decimals as tell them apart."""
    for places in range(2, 7):
        shown = tuple(f"${Decimal(x) / MICROS_PER_USD:,.{places}f}" for x in (a, b))
        if shown[0] != shown[1] or a == b:
            break
    return shown[0], shown[1]


def _unaffordable_work(ctx: PlanContext, offered: list[Vendor]) -> Action:
    """Why `choices` kept no vendor, with the figure it compared: each vendor's list price of
    the work left after the checkpoint (`Estimate.nominal`, the same for every slice)."""
    spec = ctx.state.run.job_spec
    work = sum(intervals(spec.hours, spec.checkpoint_every, ctx.resume_progress))
    if work <= 0:  # nothing was priced: no cost to show
        return Action(
            action="abort",
            reason=(
                "No vendor can be priced: no work is left after the checkpoint at "
                f"{ctx.resume_progress:.0%}"
            ),
        )
    cheapest = min(offered, key=lambda v: (round(v.base_price_per_hour * work), v.vendor_id))
    return _unaffordable(ctx, cheapest, round(cheapest.base_price_per_hour * work))


COOLING = "Every affordable vendor is cooling down after a failure"


def _lead(ctx: PlanContext, vendors: list[Vendor], best: Vendor) -> str:
    failed = sorted(
        {v.vendor_id for v in vendors if ctx.failures_in_run(v.vendor_id)} - {best.vendor_id}
    )
    if failed:
        return f"{', '.join(failed)} failed previously; switching to {best.vendor_id}"
    return f"{best.vendor_id} ({best.name}) is the best choice"


def _decide(ctx: PlanContext, options: list[Option], notes: list[str], rank) -> Action:  # type: ignore[no-untyped-def]
    if not options:
        return _no_vendor(notes)
    affordable = [o for o in options if o.cost <= ctx.available]
    if not affordable:
        cheapest = min(options, key=lambda o: (o.cost, o.vendor.vendor_id))
        return _unaffordable(ctx, cheapest.vendor, cheapest.cost)
    ready = [o for o in affordable if not ctx.cooling_down(o.vendor)]
    if not ready:
        return Action(action="wait", reason=COOLING)
    best = min(ready, key=rank)
    spec = ctx.state.run.job_spec
    compared = "; ".join(
        f"{o.vendor.vendor_id}: {format_usd(o.cost)}, p(success)={o.p_success:.2f}, "
        f"expected {format_usd(round(o.expected_cost))}"
        for o in sorted(affordable, key=rank)
    )
    return Action(
        action="start_job",
        vendor_id=best.vendor.vendor_id,
        hours=ctx.remaining_hours,
        gpu_type=spec.gpu_type,
        reason=(
            f"{_lead(ctx, [o.vendor for o in options], best.vendor)}. "
            f"Budget left {format_usd(ctx.available)}. Compared: {compared}"
        ),
    )


async def stub_planner(ctx: PlanContext) -> Action:
    """The seeds' deterministic mode: the cheapest vendor that has not failed in this run."""
    options, notes = _options(ctx)
    fresh = [o for o in options if not ctx.failures_in_run(o.vendor.vendor_id)] or options
    return _decide(ctx, fresh, notes, rank=lambda o: (o.cost, o.vendor.vendor_id))


# --- the cost-aware planner ----------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The best way to rent one vendor for the rest of the run, as the planner scored it."""

    vendor: Vendor
    hazard: float
    estimate: Estimate
    p_miss: float
    score: float  # expected cost plus the deadline's risk, micro-USD


def effective_hazard(ctx: PlanContext, vendor: Vendor) -> float:
    """The hazard the planner prices a vendor at: its learned failures per GPU-hour. Trouble in
    this run is already in it (each failure is counted) and in the vendor's cool-down. A cloud
    offer adds its preemption hazard (interruptible offers above all)."""
    return hazard(vendor) + (vendor.offer.preemption_hazard if vendor.offer else 0.0)


def _terms(ctx: PlanContext, vendor: Vendor, *, running: bool = False) -> Terms:
    # A cloud offer is billed by its increment (no payments to make) and starts after its boot.
    offer = vendor.offer
    startup = ctx.startup_of(vendor) if offer is None else offer.boot_s / 3600
    return Terms(
        price_per_hour=float(vendor.base_price_per_hour),
        hazard=effective_hazard(ctx, vendor),
        payment_overhead=float(ctx.payment_overhead) if offer is None else 0.0,
        startup_hours=0.0 if running else startup,
    )


def choices(
    ctx: PlanContext,
    vendors: list[Vendor],
    *,
    progress: float | None = None,
    running: str | None = None,
) -> list[Choice]:
    """Each vendor's best slice and its score, best first, for the work left after `progress`
    (the run's furthest checkpoint by default); `running` is the vendor already running the job,
    which needs no start-up. Vendors that the budget cannot cover are left out."""
    spec = ctx.state.run.job_spec
    start = ctx.resume_progress if progress is None else progress
    work = intervals(spec.hours, spec.checkpoint_every, start)
    if not work:
        return []
    interval = max(work)
    terms = {v.vendor_id: _terms(ctx, v, running=v.vendor_id == running) for v in vendors}
    # After a failure the rest of the work is bought at the best long-run rate on offer.
    redo_rate = min(
        best_long_run_rate(t, work, renew_fraction=RENEW_FRACTION) for t in terms.values()
    )
    hours_left = ctx.hours_left
    cheapest = min(t.price_per_hour for t in terms.values())
    steadiest = min(terms.values(), key=lambda t: (t.hazard, t.price_per_hour)).price_per_hour
    available = ctx.available  # a sum over the run's payments: once, not per slice
    result = []
    for vendor in vendors:
        t = terms[vendor.vendor_id]
        scored = []
        for e in (
            estimate(t, work, hours, renew_fraction=RENEW_FRACTION, redo_rate=redo_rate)
            for hours in slice_options(work)
        ):
            if round(e.nominal) > available:
                continue
            if hours_left is not None and not _may_pay_ahead(
                available, t, e, sum(work), interval, steadiest
            ):
                continue
            # A failure the budget could not pay to recover from misses the deadline too.
            recoverable = hours_left is None or survives_failure(
                available, t, e, sum(work), interval, cheapest
            )
            p_miss = miss_probability(
                t.hazard,
                sum(work),
                t.startup_hours,
                hours_left,
                interval_hours=interval,
                restart_hours=ctx.startup_hours,
                max_tolerated=None if recoverable else 0,
                shortest_startup=None
                if vendor.offer is not None or vendor.vendor_id == running
                else ctx.shortest_startup_of(vendor),
            )
            # Missing the deadline is priced at MISS_PENALTY times the money still at stake.
            scored.append((e.expected + p_miss * available * MISS_PENALTY, p_miss, e))
        if not scored:
            continue
        score, p_miss, best = min(scored, key=lambda se: (se[0], -se[2].slice_hours))
        result.append(Choice(vendor, t.hazard, best, p_miss, score))
    return sorted(result, key=lambda c: (c.score, c.vendor.vendor_id))


def _may_pay_ahead(
    available: float, terms: Terms, e: Estimate, work: float, interval: float, steadiest: float
) -> bool:
    """With a deadline, a slice longer than one checkpoint interval only where the budget could
    still buy the rest on the steadiest vendor after losing it at a failure. Slices of several
    intervals (0.3-0.6 h of a 1-2 h job) lost at a failure left short jobs too little money to
    finish in time on a steady vendor (deadline-tight, 1,000 jobs, seeds 7-9: misses
    8/7/13 -> 8/7/9 at the same cost; 7/7/9 with `costmodel._late_start_miss`); with money to
    spare they save payments."""
    if e.slice_hours <= interval + 1e-9:
        return True
    return survives_failure(available, terms, e, work, interval, steadiest)


def survives_failure(
    available: float, terms: Terms, e: Estimate, work: float, interval: float, cheapest: float
) -> bool:
    """Whether the budget left could still buy the rest of the work at the cheapest price after
    this vendor fails once, wherever the failure comes: it has been paid up to a slice ahead
    (and its fees), and the work since the last checkpoint is lost. The worst place is at the
    start (all the work left to buy again) or at the end (nearly all of it paid here)."""
    ahead = terms.price_per_hour * e.slice_hours * (1 + RENEW_FRACTION)
    fees = terms.payment_overhead * (e.payments + 1)
    at_start = ahead + cheapest * (work + interval)
    at_end = terms.price_per_hour * work + ahead + cheapest * interval
    return available - fees >= max(at_start, at_end)


def reconsider(ctx: PlanContext, job: Job, paid_until: float) -> str | None:
    """At a sliced job's renewal point: why to let it stop at its paid checkpoint
    (`paid_until`, run progress) and move to another vendor, or None to renew.

    The job's vendor is scored as it stands, already running; another vendor must be cheaper
    by more than one payment's overhead and a margin of the cost (SWITCH_MARGIN with a deadline,
    SWITCH_MARGIN_NO_DEADLINE without), so that the agent does not hop back and forth on noise.
    This is how a run leaves a flaky vendor when its slack for the deadline runs out, and how it
    returns to a cheap vendor once that one's cool-down ends.
    """
    vendor = ctx.vendor(job.vendor_id)
    spec = ctx.state.run.job_spec
    if vendor is not None and slack_rule.applies(ctx):
        offered = [v for v in ctx.vendors if spec.gpu_type in v.supported_gpu_types]
        return slack_rule.reconsider(ctx, job, offered)
    step = spec.checkpoint_every
    on_checkpoint = abs(paid_until - round(paid_until / step) * step) < 1e-6 or paid_until >= 1
    if vendor is None or not on_checkpoint:  # stopping between checkpoints would lose work
        return None
    offered = [
        v
        for v in ctx.vendors
        if spec.gpu_type in v.supported_gpu_types
        and (v.vendor_id == vendor.vendor_id or not ctx.cooling_down(v))
    ]
    ranked = choices(ctx, offered, progress=paid_until, running=vendor.vendor_id)
    here = next((c for c in ranked if c.vendor.vendor_id == vendor.vendor_id), None)
    if not ranked or here is None or ranked[0] is here:
        return None
    best = ranked[0]
    deadline = ctx.hours_left is not None
    margin = SWITCH_MARGIN if deadline else SWITCH_MARGIN_NO_DEADLINE
    if best.score >= here.score * (1 - margin) - ctx.payment_overhead:
        return None
    return (
        f"stopping {vendor.vendor_id} at the checkpoint at {paid_until:.0%} to move to "
        f"{best.vendor.vendor_id}: {_describe(best, deadline)}; "
        f"staying: {_describe(here, deadline)}"
    )


def _describe(choice: Choice, deadline: bool) -> str:
    e = choice.estimate
    offer = choice.vendor.offer
    if offer is not None:  # a cloud instance: billed as it runs, lost work and boot priced in
        kind = "bid" if offer.interruptible else "on-demand"
        # Failures are Poisson at the hazard over boot and work: p(finish) = exp(-mean).
        restarts = -math.log(max(e.p_complete, 1e-12))
        text = (
            f"{choice.vendor.vendor_id} ({offer.provider}/{kind} {offer.gpu}x{offer.gpu_count} "
            f"in {offer.region}): {format_usd(offer.price_per_hour)}/h, boot "
            f"~{offer.boot_s:.0f}s, {choice.hazard:.3f} failures/h, {restarts:.2f} expected "
            f"failures or preemptions (each costs a boot and the work since a checkpoint), "
            f"p(finish)={e.p_complete:.2f}, expected {format_usd(round(e.expected))}"
        )
        return text + (f", p(miss deadline)={choice.p_miss:.2f}" if deadline else "")
    paying = "at once" if e.payments == 1 else f"in {e.payments} slices of {e.slice_hours:.2f}h"
    text = (
        f"{choice.vendor.vendor_id}: {format_usd(choice.vendor.base_price_per_hour)}/h, "
        f"{choice.hazard:.3f} failures/h, paid {paying}, p(finish)={e.p_complete:.2f}, "
        f"expected {format_usd(round(e.expected))}"
    )
    return text + (f", p(miss deadline)={choice.p_miss:.2f}" if deadline else "")


def plan_cost_aware(ctx: PlanContext) -> Action:
    """The heuristic planner's decision (synchronous: the simulator calls it directly too)."""
    spec = ctx.state.run.job_spec
    notes = [
        f"{v.vendor_id} lacks {spec.gpu_type}"
        for v in ctx.vendors
        if spec.gpu_type not in v.supported_gpu_types
    ]
    offered = [v for v in ctx.vendors if spec.gpu_type in v.supported_gpu_types]
    if not offered:
        return _no_vendor(notes)
    if slack_rule.applies(ctx):  # a deadline, and failures that lose no work: slack decides
        fits = [
            v
            for v in offered
            if round(v.base_price_per_hour * ctx.remaining_hours) <= ctx.available
        ]
        if not fits:
            cheapest = min(offered, key=lambda v: (v.base_price_per_hour, v.vendor_id))
            return _unaffordable(
                ctx, cheapest, round(cheapest.base_price_per_hour * ctx.remaining_hours)
            )
        return slack_rule.plan(ctx, fits)
    affordable = choices(ctx, offered)
    if not affordable:
        return _unaffordable_work(ctx, offered)
    ready = [c for c in affordable if not ctx.cooling_down(c.vendor)]
    if not ready:
        return Action(action="wait", reason=COOLING)
    best = ready[0]
    deadline = ctx.hours_left is not None
    where = f" from the checkpoint at {ctx.resume_progress:.0%}" if ctx.resume_progress > 0 else ""
    context = f"{ctx.remaining_hours:.2f}h of work left{where}; budget left " + format_usd(
        ctx.available
    )
    if deadline:
        context += f"; deadline in {ctx.hours_left:.2f}h"
    cooling = [c.vendor.vendor_id for c in affordable if ctx.cooling_down(c.vendor)]
    compared = "; ".join(_describe(c, deadline) for c in ready)
    if cooling:
        compared += f"; cooling down: {', '.join(cooling)}"
    e = best.estimate
    return Action(
        action="start_job",
        vendor_id=best.vendor.vendor_id,
        hours=ctx.remaining_hours,
        gpu_type=spec.gpu_type,
        slice_hours=e.slice_hours if e.payments > 1 else None,
        reason=(
            f"{_lead(ctx, offered, best.vendor)}. {context}. "
            f"Lowest expected cost to completion: {compared}"
        ),
    )


async def heuristic_planner(ctx: PlanContext) -> Action:
    return plan_cost_aware(ctx)


DETERMINISTIC: dict[str, Planner] = {"stub": stub_planner, "heuristic": heuristic_planner}
