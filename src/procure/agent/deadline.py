"""The slack rule: how a run with a deadline and (near) continuous checkpoints spends its slack
between a cheap interruptible vendor and a steady one ("Can't Be Late", NSDI '24, done lazily).

With continuous checkpoints a failure loses no work, only time: the restart overhead, and the
wait for capacity to come back. Slack (hours to the deadline beyond the work left) is what pays
for both. The rule: run on the cheapest vendor whenever it has capacity and a failure there
would still leave time to restart on the steady one; while it has none, wait for it as long as
the slack stays above a reserve; otherwise run on the steady vendor, and leave it for the cheap
one again as soon as that is safe. The reserve keeps slack for the restarts that the cheap
vendor's learned failure rate says the rest of the work will need: waiting out one long outage
early must not leave the run stuck on the steady vendor for good (greedy's weakness).
"""

from __future__ import annotations

from procure.agent.context import PlanContext, hazard
from procure.models import Action, Job, Vendor, format_usd

# Checkpoints at most this far apart (hours of work) count as continuous: a failure loses only
# time, and this rule plans the run.
CONTINUOUS_CHECKPOINT_HOURS = 1 / 60
# Slack held back from waiting, in restarts (a move away and back: two start-ups each) per
# failure expected in the rest of the work at the cheap vendor's learned rate.
RESERVE_RESTARTS = 3.0
# Paid at a time on either vendor: a preemption loses at most what is left of it.
SLICE_HOURS = 0.25
EPS = 1e-9


def applies(ctx: PlanContext) -> bool:
    spec = ctx.state.run.job_spec
    continuous = spec.hours * spec.checkpoint_every <= CONTINUOUS_CHECKPOINT_HOURS + EPS
    return ctx.hours_left is not None and continuous


def slack(ctx: PlanContext) -> float:
    """Hours before the deadline beyond the work left."""
    assert ctx.hours_left is not None
    return ctx.hours_left - ctx.remaining_hours


def reserve(ctx: PlanContext, cheap: Vendor) -> float:
    """Slack not to spend on waiting: restarts for the failures the rest of the work expects."""
    restarts = hazard(cheap) * ctx.remaining_hours * RESERVE_RESTARTS
    return restarts * 2 * ctx.startup_hours


def cheap_and_steady(ctx: PlanContext, offered: list[Vendor]) -> tuple[Vendor, Vendor]:
    """The cheapest vendor, and the steadiest (lowest learned hazard; the cheaper on a tie)."""
    cheap = min(offered, key=lambda v: (v.base_price_per_hour, hazard(v), v.vendor_id))
    steady = min(offered, key=lambda v: (hazard(v), v.base_price_per_hour, v.vendor_id))
    return cheap, steady


def _wait_hours(ctx: PlanContext, vendor: Vendor) -> float:
    assert vendor.cooldown_until is not None
    return max((vendor.cooldown_until - ctx.now).total_seconds() / 3600, 0.0)


def safe_to_start(ctx: PlanContext) -> bool:
    """A start-up on an interruptible vendor, then a failure at any moment, then a start-up on
    the steady one: the work still fits (a failure during the work costs no progress)."""
    return slack(ctx) >= 2 * ctx.startup_hours - EPS


def _start(ctx: PlanContext, vendor: Vendor, why: str) -> Action:
    hours = ctx.remaining_hours
    return Action(
        action="start_job",
        vendor_id=vendor.vendor_id,
        hours=hours,
        gpu_type=ctx.state.run.job_spec.gpu_type,
        slice_hours=SLICE_HOURS if hours - EPS > SLICE_HOURS else None,
        reason=why,
    )


def _figures(ctx: PlanContext, cheap: Vendor) -> str:
    return (
        f"{ctx.remaining_hours:.2f}h of work left, deadline in {ctx.hours_left:.2f}h: "
        f"slack {slack(ctx):.2f}h, reserve {reserve(ctx, cheap):.2f}h "
        f"({cheap.vendor_id}: {hazard(cheap):.3f} failures/h); budget left "
        f"{format_usd(ctx.available)}"
    )


def plan(ctx: PlanContext, offered: list[Vendor]) -> Action:
    """The decision for a run with nothing running."""
    cheap, steady = cheap_and_steady(ctx, offered)
    figures = _figures(ctx, cheap)
    if not ctx.cooling_down(cheap) and (cheap is steady or safe_to_start(ctx)):
        return _start(ctx, cheap, f"{cheap.vendor_id} is the cheapest and has capacity; {figures}")
    if ctx.cooling_down(cheap):
        wait = _wait_hours(ctx, cheap)
        if slack(ctx) - wait >= ctx.startup_hours + reserve(ctx, cheap) - EPS:
            return Action(
                action="wait",
                reason=f"waiting {wait:.2f}h for {cheap.vendor_id} to have capacity; {figures}",
            )
    if ctx.cooling_down(steady):
        return Action(action="wait", reason=f"{steady.vendor_id} is cooling down too; {figures}")
    return _start(ctx, steady, f"no slack to wait for {cheap.vendor_id}: {figures}")


def reconsider(ctx: PlanContext, job: Job, offered: list[Vendor]) -> str | None:
    """At a renewal: leave the steady vendor for the cheap one once that has capacity again and
    a failure there would still leave time to come back."""
    cheap, _ = cheap_and_steady(ctx, offered)
    if job.vendor_id == cheap.vendor_id or ctx.cooling_down(cheap) or not safe_to_start(ctx):
        return None
    return (
        f"stopping {job.vendor_id} to move to {cheap.vendor_id}, which has capacity again; "
        + _figures(ctx, cheap)
    )
