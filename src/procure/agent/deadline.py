"""The slack rule: how a run with a deadline and (near) continuous checkpoints spends its slack
between a cheap interruptible vendor and a steady one ("Can't Be Late", NSDI '24, done lazily).

With continuous checkpoints a failure loses no work, only time: the restart overhead, and the
wait for capacity to come back. Slack (hours to the deadline beyond the work left) pays for
both. The rule: run on the cheapest vendor whenever it has capacity and a failure there would
still leave time to restart on the steady one. Slack is budgeted over the outages the rest of
the work expects (the cheap vendor's learned failure rate times the work left): each is owed
the restarts around it (a start-up back on the cheap vendor, and one on the steady vendor if it
runs long), and what is left over pays for waiting. While the cheap vendor has no capacity, the
run waits as long as those outages, each waited out up to the length this one has reached
(lengths learned from the outages seen in this run), still fit in what is left over, weighed
the more the dearer a restart and the more work is left per hour of slack, and the wait leaves
slack for a return to the cheap vendor: short outages are waited out, a long one goes to the
steady vendor, whose start-up costs paid time; early in a tight run little is waited out, near
its end whole outages are.
Off the steady vendor the run goes back to the cheap one as soon as that is safe, or, when the
slack can no longer pay half of every outage's restarts, once the cheap vendor has stayed up a
while (a blip of capacity would cost two start-ups for little work).
"""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise

from procure.agent.context import PlanContext, hazard
from procure.models import Action, Job, Vendor, format_usd

# Checkpoints at most this far apart (hours of work) count as continuous: a failure loses only
# time, and this rule plans the run.
CONTINUOUS_CHECKPOINT_HOURS = 1 / 60
# Start-ups owed to each outage the rest of the work expects: one back on the cheap vendor,
# and one on the steady vendor in case the outage runs long.
RESTARTS_PER_OUTAGE = 2.0
# The weight of the waiting tally against the spare slack, per hour of start-up time and per
# (hour of work left per hour of slack) squared: with little slack per hour of work it must be
# kept for restarts, the more so the dearer a restart and the more work is left (the exact
# optimum on the traces' fitted chains waits out almost nothing early in a run and whole
# outages near its end); with plenty, waiting is cheap (the tally assumes every outage is
# waited out as far as this one, which short ones never are). Chosen on the us-west-2a spot
# traces among a few; us-west-2b was held out.
WAIT_WEIGHT = 0.1
# Slack a wait must leave, in start-ups: under two the run can never go back to the cheap
# vendor (a start-up there, and one on the steady vendor if it fails), so a wait that ends
# there only spends what the rest of the run needs to use the cheap vendor at all.
WAIT_LEAVES_STARTUPS = 3.0
# What the run expects of outages before it has seen any (hours): minutes to hours.
PRIOR_OUTAGE_HOURS = (0.2, 0.5, 1.0, 3.0)
# When slack cannot pay this share of the restarts owed to the expected outages, the cheap
# vendor must have stayed up this many start-ups before the run leaves the steady vendor for
# it. Not every restart: most outages are waited out and owe one, and the exact optimum on the
# traces' fitted chains goes back at once with far less slack than all of them need (chosen on
# the us-west-2a traces and their fitted chains; us-west-2b was held out).
CONFIRM_SHARE = 0.5
CONFIRM_STARTUPS = 1.5
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


def outages_ahead(ctx: PlanContext, cheap: Vendor) -> float:
    """Outages the rest of the work expects on the cheap vendor, at its learned failure rate."""
    return hazard(cheap) * ctx.remaining_hours


def spare(ctx: PlanContext, cheap: Vendor, share: float = 1.0) -> float:
    """Slack beyond a last start-up and (`share` of) the restarts every expected outage is
    owed."""
    owed = outages_ahead(ctx, cheap) * RESTARTS_PER_OUTAGE * ctx.startup_hours
    return slack(ctx) - ctx.startup_hours - share * owed


def cheap_and_steady(ctx: PlanContext, offered: list[Vendor]) -> tuple[Vendor, Vendor]:
    """The cheapest vendor, and the steadiest (lowest learned hazard; the cheaper on a tie)."""
    cheap = min(offered, key=lambda v: (v.base_price_per_hour, hazard(v), v.vendor_id))
    steady = min(offered, key=lambda v: (hazard(v), v.base_price_per_hour, v.vendor_id))
    return cheap, steady


def _hours(later: datetime, earlier: datetime) -> float:
    return max((later - earlier).total_seconds() / 3600, 0.0)


def _wait_hours(ctx: PlanContext, vendor: Vendor) -> float:
    assert vendor.cooldown_until is not None
    return _hours(vendor.cooldown_until, ctx.now)


def _ended(job: Job) -> datetime:
    return job.completed_at or job.updated_at


def outages_seen(ctx: PlanContext, cheap: Vendor) -> tuple[list[float], datetime]:
    """Lengths (hours) of the cheap vendor's outages seen in this run, each from a job's failure
    there to the next job started there, and when the current one began (its last failure, or
    the run's start if no job has failed there)."""
    jobs = sorted(
        (j for j in ctx.state.jobs if j.vendor_id == cheap.vendor_id), key=lambda j: j.created_at
    )
    lengths = [
        _hours(after.created_at, _ended(before))
        for before, after in pairwise(jobs)
        if before.status == "failed"
    ]
    failed = [j for j in jobs if j.status == "failed"]
    began = _ended(failed[-1]) if failed else ctx.state.run.created_at
    return lengths, began


def worth_waiting(ctx: PlanContext, cheap: Vendor) -> tuple[bool, str]:
    """Whether to wait out the cheap vendor's outage until its next check, and the figures:
    the expected outages, each waited out up to one check beyond the length this one will
    have reached by then (the outages seen, this one included, tell how long they run), must
    fit in the spare slack."""
    wait = _wait_hours(ctx, cheap)
    lengths, began = outages_seen(ctx, cheap)
    reached = _hours(ctx.now, began) + wait
    sample = [*PRIOR_OUTAGE_HOURS, *lengths, reached]
    mean = sum(min(length, reached + wait) for length in sample) / len(sample)
    ahead = outages_ahead(ctx, cheap)
    left = spare(ctx, cheap)
    # EPS: no slack left and no start-up time (free restarts) must not divide by zero.
    per_slack = ctx.remaining_hours / max(slack(ctx), ctx.startup_hours, EPS)
    weight = WAIT_WEIGHT * ctx.startup_hours * per_slack**2
    fits = left > 0 and weight * ahead * mean <= left
    safe = slack(ctx) - wait >= WAIT_LEAVES_STARTUPS * ctx.startup_hours - EPS
    figures = (
        f"outage {reached:.2f}h long by then ({len(lengths)} seen this run); "
        f"{ahead:.1f} outages expected, waited out up to that length {mean:.2f}h each on "
        f"average, weighted {weight:.2f}, against {max(left, 0.0):.2f}h of spare slack"
    )
    return fits and safe, figures


def up_for(ctx: PlanContext, vendor: Vendor) -> float:
    """Hours the vendor has had capacity: since its last cool-down ended, or the run began."""
    since = vendor.cooldown_until or ctx.state.run.created_at
    return _hours(ctx.now, max(since, ctx.state.run.created_at))


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
        f"slack {slack(ctx):.2f}h, {max(spare(ctx, cheap), 0.0):.2f}h of it spare after "
        f"{RESTARTS_PER_OUTAGE:g} start-ups for each of {outages_ahead(ctx, cheap):.1f} expected "
        f"outages ({cheap.vendor_id}: {hazard(cheap):.3f} failures/h); budget left "
        f"{format_usd(ctx.available)}"
    )


def plan(ctx: PlanContext, offered: list[Vendor]) -> Action:
    """The decision for a run with nothing running."""
    cheap, steady = cheap_and_steady(ctx, offered)
    figures = _figures(ctx, cheap)
    if not ctx.cooling_down(cheap) and (cheap is steady or safe_to_start(ctx)):
        return _start(ctx, cheap, f"{cheap.vendor_id} is the cheapest and has capacity; {figures}")
    if ctx.cooling_down(cheap):
        wait, why = worth_waiting(ctx, cheap)
        if wait:
            return Action(
                action="wait",
                reason=f"waiting for {cheap.vendor_id} to have capacity: {why}; {figures}",
            )
        figures = f"{why}; {figures}"
    if ctx.cooling_down(steady):
        return Action(action="wait", reason=f"{steady.vendor_id} is cooling down too; {figures}")
    return _start(ctx, steady, f"no slack to wait for {cheap.vendor_id}: {figures}")


def reconsider(ctx: PlanContext, job: Job, offered: list[Vendor]) -> str | None:
    """At a renewal: leave the steady vendor for the cheap one once that has capacity again and
    a failure there would still leave time to come back; when the slack cannot pay half of
    every expected outage's restarts, only once the cheap vendor has stayed up a while."""
    cheap, _ = cheap_and_steady(ctx, offered)
    if job.vendor_id == cheap.vendor_id or ctx.cooling_down(cheap) or not safe_to_start(ctx):
        return None
    up = up_for(ctx, cheap)
    if spare(ctx, cheap, CONFIRM_SHARE) < 0 and up < CONFIRM_STARTUPS * ctx.startup_hours - EPS:
        return None
    return (
        f"stopping {job.vendor_id} to move to {cheap.vendor_id}, which has had capacity again "
        f"for {up:.2f}h; " + _figures(ctx, cheap)
    )
