"""The deterministic planners: `stub` (cheapest vendor not yet failed) and `heuristic` (lowest
expected cost to completion: price over learned reliability, discounted for failures this run).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from procure.agent.context import PlanContext, reliability
from procure.models import Action, Vendor, format_usd

Planner = Callable[[PlanContext], Awaitable[Action]]

# Each failure or error this run halves a vendor's chance in the planner's eyes.
RUN_FAILURE_PENALTY = 0.5


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
        cost = round(vendor.base_price_per_hour * spec.hours)
        options.append(Option(vendor, cost, p))
    return options, notes


def _decide(ctx: PlanContext, options: list[Option], notes: list[str], rank) -> Action:  # type: ignore[no-untyped-def]
    if not options:
        return Action(
            action="abort", reason="No vendor offers what the job needs: " + "; ".join(notes)
        )
    affordable = [o for o in options if o.cost <= ctx.available]
    if not affordable:
        cheapest = min(options, key=lambda o: o.cost)
        return Action(
            action="abort",
            reason=(
                f"No vendor is affordable: the cheapest, {cheapest.vendor.vendor_id}, costs "
                f"{format_usd(cheapest.cost)} and {format_usd(ctx.available)} is left"
            ),
        )
    ready = [o for o in affordable if not ctx.cooling_down(o.vendor)]
    if not ready:
        return Action(
            action="wait", reason="Every affordable vendor is cooling down after a failure"
        )
    best = min(ready, key=rank)
    spec = ctx.state.run.job_spec
    failed = sorted(
        {o.vendor.vendor_id for o in options if ctx.failures_in_run(o.vendor.vendor_id)}
        - {best.vendor.vendor_id}
    )
    lead = (
        f"{', '.join(failed)} failed previously; switching to {best.vendor.vendor_id}"
        if failed
        else (f"{best.vendor.vendor_id} ({best.vendor.name}) is the best choice")
    )
    compared = "; ".join(
        f"{o.vendor.vendor_id}: {format_usd(o.cost)}, p(success)={o.p_success:.2f}, "
        f"expected {format_usd(round(o.expected_cost))}"
        for o in sorted(affordable, key=rank)
    )
    return Action(
        action="start_job",
        vendor_id=best.vendor.vendor_id,
        hours=spec.hours,
        gpu_type=spec.gpu_type,
        reason=f"{lead}. Budget left {format_usd(ctx.available)}. Compared: {compared}",
    )


async def heuristic_planner(ctx: PlanContext) -> Action:
    options, notes = _options(ctx)
    return _decide(ctx, options, notes, rank=lambda o: (o.expected_cost, o.vendor.vendor_id))


async def stub_planner(ctx: PlanContext) -> Action:
    """The seeds' deterministic mode: the cheapest vendor that has not failed in this run."""
    options, notes = _options(ctx)
    fresh = [o for o in options if not ctx.failures_in_run(o.vendor.vendor_id)] or options
    return _decide(ctx, fresh, notes, rank=lambda o: (o.cost, o.vendor.vendor_id))


DETERMINISTIC: dict[str, Planner] = {"stub": stub_planner, "heuristic": heuristic_planner}
