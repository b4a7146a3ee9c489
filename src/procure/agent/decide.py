"""One decision: the planner proposes, the guard disposes, the deterministic planner stands in.

Shared by the tick and the market simulator, so that the simulator replays exactly the decisions
the agent would take.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from procure.agent.context import PlanContext
from procure.agent.guard import check_action
from procure.agent.planner import DETERMINISTIC, Planner
from procure.models import Action

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
        return Decision(action)
    fallback = await DETERMINISTIC["heuristic"](ctx)
    if check_action(ctx, fallback) is not None:  # cannot happen for the heuristic; be safe
        fallback = Action(action="wait", reason=f"No safe action: {rejection}")
    return Decision(fallback, rejected=action, rejection=rejection)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (the deterministic planners) without an event loop;
    the simulator makes tens of thousands of decisions and needs them cheap."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("the planner awaited something: only non-suspending planners can be run")
