"""The policies the benchmark compares (the oracle lives in `oracle.py`).

- `seeds`: the seeds' agent: the stub planner (cheapest vendor not yet failed in the run), the
  whole job paid up front, and every failure restarts the job from zero.
- `greedy`: cheapest available vendor with failover (SkyPilot-like): resumes from checkpoints,
  but always the cheapest vendor not cooling down, paid up front for the work left.
- `procure`: the agent as it is: the heuristic (cost-aware) planner, checkpoint resume, and
  pay-as-you-go slices when the planner asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from procure.agent.context import PlanContext
from procure.agent.planner import (
    Planner,
    Reconsider,
    heuristic_planner,
    reconsider,
    stub_planner,
)
from procure.models import Action, format_usd


@dataclass(frozen=True)
class Policy:
    name: str
    planner: Planner
    resume: bool  # whether a new job resumes from the last checkpoint
    # At each renewal of a sliced job, why to let it stop instead (None: always renew).
    reconsider: Reconsider | None = reconsider


async def greedy_planner(ctx: PlanContext) -> Action:
    """The cheapest vendor that offers the GPU, is not cooling down, and fits the budget."""
    spec = ctx.state.run.job_spec
    hours = ctx.remaining_hours
    offered = [v for v in ctx.vendors if spec.gpu_type in v.supported_gpu_types]
    affordable = [v for v in offered if round(v.base_price_per_hour * hours) <= ctx.available]
    if not affordable:
        return Action(action="abort", reason="No vendor is affordable")
    ready = [v for v in affordable if not ctx.cooling_down(v)]
    if not ready:
        return Action(action="wait", reason="Every affordable vendor is cooling down")
    best = min(ready, key=lambda v: (v.base_price_per_hour, v.vendor_id))
    return Action(
        action="start_job",
        vendor_id=best.vendor_id,
        hours=hours,
        gpu_type=spec.gpu_type,
        reason=f"{best.vendor_id} is the cheapest available at "
        f"{format_usd(best.base_price_per_hour)}/h",
    )


SEEDS = Policy("seeds", stub_planner, resume=False)
GREEDY = Policy("greedy", greedy_planner, resume=True)
PROCURE = Policy("procure", heuristic_planner, resume=True)
POLICIES: tuple[Policy, ...] = (SEEDS, GREEDY, PROCURE)
