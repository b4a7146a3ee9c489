"""The exact non-clairvoyant optimum of the simulated market: the least expected cost to finish a
job for a policy that knows every vendor's true hazard but not when its failures come.

The model is the simulator's. A job on vendor v is paid in slices of `s` hours (the first at
once, each next one as the paid time runs out, only if the vendor is still alive: the simulator's
tick may renew that late, and a renewal bought later is never dearer, as a vendor that dies
first is not paid; `optimal_policy` renews then),
each slice costing its hours at v's price plus the payment fee; v fails at rate `hazard` from the
moment it is paid (start-up included); a failure, or a job that ends, leaves the run at its last
checkpoint. Refusals and cool-downs only cost time, and without a deadline time is free: waiting
them out loses nothing. Failures are memoryless, so a policy that knows the hazards learns
nothing from the past: between jobs the state is the run's checkpoint `m` alone, and a job is
(vendor, the checkpoint it ends at, slice). A job ending between checkpoints is never better
than one ending at the checkpoint before (same outcomes, less paid), and stopping a sliced job
at a renewal is the same as a shorter job, so this covers every policy the simulator can play.

Then V(n) = 0 and, backwards, V(m) = min over (v, d, s) of
    money(v, s, h) + sum_j P(fail in interval j) V(m + j - 1) + P(survive) V(m + d)
with h the work of the d intervals after m. A failure in the start-up or the first interval
leaves the run at m: that term is V(m) itself, so each option's value solves a linear equation
(the minimum of such affine maps has, as fixed point, the minimum of their fixed points). Where
a failure leaves the run does not depend on the slices, so the slice only enters `money`, a
one-dimensional minimisation done over every whole number of equal slices (rigorously cut off
where fees alone exceed the best) and refined inside the pieces around the best. With a
deadline, time is no longer free; dropping the deadline gives a lower bound, which is what the
deadline scenario reports.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import timedelta

from procure.agent.context import PlanContext
from procure.agent.costmodel import intervals
from procure.agent.planner import Reconsider
from procure.agent.slices import paid_hours
from procure.models import Action, Job
from procure.sim.market import Market, VendorSpec
from procure.sim.policies import Policy

EPS = 1e-12
# The share of a slice left when the next one is bought. The agent's tick renews at
# `RENEW_FRACTION`, but a renewal it lets pass is asked again as the paid time runs out
# (`engine._renew(stopping=True)`), and buying then is never dearer: the least is at 0.
LAST_RENEWAL = 0.0


@dataclass(frozen=True)
class Step:
    """The optimal job from a checkpoint: vendor, intervals to run, slice hours (None: at once)."""

    vendor_id: str
    intervals: int
    slice_hours: float | None


@dataclass(frozen=True)
class Plan:
    values: tuple[float, ...]  # V(m), micro-USD, for each checkpoint m (the last one is 0)
    steps: tuple[Step, ...]  # the optimal job from each checkpoint but the last
    positions: tuple[float, ...]  # hours of work done at each checkpoint


def money(v: VendorSpec, fee: float, s: float, h: float, rho: float = LAST_RENEWAL) -> float:
    """Expected payments for a job of `h` hours on `v` paid in slices of `s` hours."""
    lam, p = v.hazard, v.price_per_hour
    j = math.ceil(h / s - 1e-9)
    if j <= 1:
        return fee + p * h
    last = h - (j - 1) * s
    # Payment i >= 2 is made at u + (i - 1 - rho) s hours after the first, if still alive.
    a = math.exp(-lam * (v.startup_hours - rho * s))
    q = math.exp(-lam * s)
    geo = (q - q ** (j - 1)) / -math.expm1(-lam * s) if lam * s > EPS else float(j - 2)
    return (fee + p * s) * (1 + a * geo) + a * q ** (j - 1) * (fee + p * last)


def _golden(f, lo: float, hi: float, iters: int = 32) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def best_money(v: VendorSpec, fee: float, h: float) -> tuple[float, float | None]:
    """(least expected payments, slice hours or None for one payment) for `h` hours on `v`."""
    lam, p = v.hazard, v.price_per_hour
    start = math.exp(-lam * v.startup_hours)
    worked = start * (-math.expm1(-lam * h) / lam if lam > EPS else h)  # E[hours of work done]
    best, best_j = fee + p * h, 1
    j = 2
    # Every hour worked is paid, and payment i >= 2 is made iff the work reached (i-1-rho) s:
    # E[payments] >= E[work done] / s = j E[work] / h, so past this j fees alone lose.
    while p * worked + fee * j * worked / h < best:
        m = money(v, fee, h / j, h)
        if m < best:
            best, best_j = m, j
        j += 1
    # Inside a piece (j slices, the last one partial) the cost is smooth: refine on both sides.
    slice_hours = None if best_j == 1 else h / best_j
    for pieces in (best_j + 1, best_j):
        if pieces < 2:
            continue
        lo, hi = h / pieces, h / (pieces - 1)
        s, m = _golden(lambda s: money(v, fee, s, h), lo * (1 + 1e-9), hi * (1 - 1e-9))
        if m < best:
            best, slice_hours = m, s
    return best, slice_hours


def plan(market: Market, hours: float, checkpoint_every: float) -> Plan:
    """The optimal policy and its expected cost from every checkpoint of one job."""
    return _plan(market, round(hours, 9), round(checkpoint_every, 12))


@functools.lru_cache(maxsize=8192)
def _plan(market: Market, hours: float, checkpoint_every: float) -> Plan:
    work = intervals(hours, checkpoint_every, 0.0)
    n = len(work)
    pos = [0.0]
    for w in work:
        pos.append(pos[-1] + w)
    fee = float(market.payment_fee)
    table: dict[tuple[str, float], tuple[float, float | None]] = {}

    def cheapest(v: VendorSpec, h: float) -> tuple[float, float | None]:
        key = (v.vendor_id, round(h, 9))
        if key not in table:
            table[key] = best_money(v, fee, h)
        return table[key]

    values = [0.0] * (n + 1)
    steps: list[Step] = []
    for m in range(n - 1, -1, -1):
        options = []  # (lower bound, vendor, d, later, alive, stay) for each job from m
        for v in market.vendors:
            lam = v.hazard
            alive = math.exp(-lam * v.startup_hours)  # P(alive at the current checkpoint)
            stay = 1.0 - alive  # P(the run ends this job at m): rises with the first interval
            later = 0.0  # sum of P(fail in interval j) V(m + j - 1) for j >= 2
            worked = 0.0  # E[hours of work done]: each is paid, so money >= fee + price * it
            for d in range(1, n - m + 1):
                hours = pos[m + d] - pos[m + d - 1]
                nxt = alive * math.exp(-lam * hours)
                worked += alive * (-math.expm1(-lam * hours) / lam if lam > EPS else hours)
                if d == 1:
                    stay += alive - nxt
                else:
                    later += (alive - nxt) * values[m + d - 1]
                alive = nxt
                if 1 - stay <= EPS:
                    continue
                rest = later + alive * values[m + d]
                low = (fee + v.price_per_hour * worked + rest) / (1 - stay)
                options.append((low, v, d, rest, stay))
        options.sort(key=lambda o: o[0])
        best, step = math.inf, Step("", 0, None)
        for low, v, d, rest, stay in options:
            if low >= best:
                break  # every option left is bounded below by at least the best found
            cost, s = cheapest(v, pos[m + d] - pos[m])
            value = (cost + rest) / (1 - stay)
            if value < best:
                best, step = value, Step(v.vendor_id, d, s)
        values[m] = best
        steps.append(step)
    return Plan(tuple(values), tuple(reversed(steps)), tuple(pos))


def checkpoint_index(p: Plan, progress: float, hours: float) -> int:
    """The checkpoint a run at `progress` (a fraction of the job) resumes from."""
    done = progress * hours
    return max(i for i, x in enumerate(p.positions) if x <= done + 1e-6)


def expected_cost(market: Market, hours: float, checkpoint_every: float, progress: float) -> float:
    """Micro-USD the optimal policy expects to pay to finish a job from `progress`."""
    p = plan(market, hours, checkpoint_every)
    return p.values[checkpoint_index(p, progress, hours)]


def renew_last(market: Market) -> Reconsider:
    """A reconsider that lets each renewal point pass and renews as the paid time runs out
    (`LAST_RENEWAL`): the slice after a vendor's failure in between is never paid."""
    startup = {v.vendor_id: v.startup_hours for v in market.vendors}

    def reconsider(ctx: PlanContext, job: Job, paid_until: float) -> str | None:
        paid = paid_hours(job, ctx.state.payments)
        ends = job.created_at + timedelta(hours=startup.get(job.vendor_id, 0.0) + paid)
        if ctx.now < ends - timedelta(seconds=1):
            return "renewed as the paid time runs out"
        return None

    return reconsider


def optimal_policy(market: Market) -> Policy:
    """The optimum as a policy the simulator can play (it is told the true hazards): from each
    checkpoint, the optimal job, renewed as its paid time runs out; a vendor cooling down or
    refusing is waited for."""

    async def planner(ctx: PlanContext) -> Action:
        spec = ctx.state.run.job_spec
        p = plan(market, spec.hours, spec.checkpoint_every)
        m = checkpoint_index(p, ctx.resume_progress, spec.hours)
        step = p.steps[m]
        vendor = ctx.vendor(step.vendor_id)
        if vendor is None:
            return Action(action="abort", reason=f"{step.vendor_id} is not in the registry")
        if ctx.cooling_down(vendor):
            return Action(action="wait", reason=f"waiting for {vendor.vendor_id}")
        hours = p.positions[m + step.intervals] - p.positions[m]
        if round(vendor.base_price_per_hour * hours) > ctx.available:
            return Action(action="abort", reason="over budget")
        return Action(
            action="start_job",
            vendor_id=vendor.vendor_id,
            hours=hours,
            gpu_type=spec.gpu_type,
            slice_hours=step.slice_hours,
            reason=f"optimal: {step.intervals} intervals on {vendor.vendor_id}",
        )

    return Policy("optimum", planner, resume=True, reconsider=renew_last(market))
