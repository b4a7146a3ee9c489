"""One decision: the planner proposes, the guard disposes, the deterministic planner stands in.

Shared by the tick and the market simulator, so that the simulator replays exactly the decisions
the agent would take.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from procure.agent.context import PlanContext
from procure.agent.guard import check_action
from procure.agent.planner import DETERMINISTIC, Planner
from procure.models import Action, Vendor, format_usd

T = TypeVar("T")


@dataclass(frozen=True)
class Decision:
    action: Action
    rejected: Action | None = None  # the planner's action, when the guard refused it
    rejection: str | None = None


async def decide(planner: Planner, ctx: PlanContext) -> Decision:
    action = await planner(ctx)
    rejection = check_action(ctx, action)
    if rejection is None:
        # Only the deterministic planners' reasons carry the figures they compared.
        return Decision(_explained(ctx, action, figures=planner in DETERMINISTIC.values()))
    fallback = await DETERMINISTIC["heuristic"](ctx)
    if check_action(ctx, fallback) is not None:  # cannot happen for the heuristic; be safe
        fallback = Action(action="wait", reason=f"No safe action: {rejection}")
    return Decision(_explained(ctx, fallback, figures=True), rejected=action, rejection=rejection)


def _explained(ctx: PlanContext, action: Action, *, figures: bool = False) -> Action:
    """`action`, its reason led by why it returns to a vendor that failed earlier in this run
    (whichever planner chose it): a return must never look like an oversight."""
    why = returning(ctx, action, figures=figures)
    if why is None:
        return action
    return action.model_copy(update={"reason": f"{why}. {action.reason}"})


def returning(ctx: PlanContext, action: Action, *, figures: bool = False) -> str | None:
    """Why a `start_job` goes back to a vendor whose job failed earlier in this run: which job
    failed, how and when, that its cool-down is over, and how its price compares; None when
    the vendor has not failed a job in this run. `figures`: the action's reason, which
    follows, names the figures the planner compared."""
    vendor = ctx.vendor(action.vendor_id) if action.action == "start_job" else None
    if vendor is None:
        return None
    failed = [j for j in ctx.state.jobs if j.vendor_id == vendor.vendor_id and j.status == "failed"]
    if not failed:
        return None
    last = max(failed, key=lambda j: j.completed_at or j.updated_at)
    at = last.completed_at or last.updated_at
    job = last.vendor_job_id or last.id
    what = f"{len(failed)} jobs failed there this run, the last" if len(failed) > 1 else "it"
    parts = [
        f"Returns to {vendor.vendor_id}: {what} failed job {job} at {last.progress:.0%} "
        f"({_said(last.error_message)}) at {at:%H:%M:%S} UTC, "
        f"{_minutes(ctx.now - at)} ago"
    ]
    if vendor.cooldown_until is not None and vendor.cooldown_until <= ctx.now:
        parts.append(f"its cool-down ended at {vendor.cooldown_until:%H:%M:%S} UTC")
    elif vendor.cooldown_until is None:
        parts.append("it is not cooling down")
    parts.append(_price_note(ctx, vendor, figures))
    return "; ".join(parts)


def _said(error: str | None) -> str:
    text = " ".join((error or "no reason given").split())
    return text if len(text) <= 120 else text[:119] + "…"


def _minutes(span: timedelta) -> str:
    seconds = max(span.total_seconds(), 0.0)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _price_note(ctx: PlanContext, vendor: Vendor, figures: bool) -> str:
    """How the vendor's price compares with the others that could take the job now (and, when
    `figures` follow in the reason, that it scores best on them)."""
    gpu = ctx.state.run.job_spec.gpu_type
    others = [
        v
        for v in ctx.vendors
        if v.vendor_id != vendor.vendor_id
        and gpu in v.supported_gpu_types
        and not ctx.cooling_down(v)
    ]
    if not others:
        return f"no other vendor offers {gpu} now"
    rival = min(others, key=lambda v: (v.base_price_per_hour, v.vendor_id))
    gap = rival.base_price_per_hour - vendor.base_price_per_hour
    hours = ctx.remaining_hours
    if gap > 0:
        return (
            f"it is still the cheapest by {format_usd(gap)}/h "
            f"({format_usd(round(gap * hours))} on the {hours:g}h left; next: "
            f"{rival.vendor_id} at {format_usd(rival.base_price_per_hour)}/h)"
        )
    best = " scores best on the figures below" if figures else ""
    if gap == 0:
        return f"it costs what {rival.vendor_id} costs" + (f" and{best}" if best else "")
    less = f"it is not the cheapest ({rival.vendor_id} is {format_usd(-gap)}/h less)"
    return less + (f" but{best}" if best else "")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (the deterministic planners) without an event loop;
    the simulator makes tens of thousands of decisions and needs them cheap."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("the planner awaited something: only non-suspending planners can be run")
