"""What the dashboard's buttons do, through the same functions as the API: start a run
(validated by the API's `StartRequest`) and cancel one (recorded, then carried out at once when
nobody else is ticking it)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from pydantic import ValidationError

from procure.agent import metrics, runlog
from procure.agent.cancel import request_cancel
from procure.agent.leased_tick import LeaseHeld
from procure.agent.start_request import StartRequest, problems
from procure.loopthread import AgentLoop
from procure.models import Run, RunStatus, utcnow
from procure.store import Store, repo

NUMBERS = ("budgetTotal", "hours", "deadlineHours")
LABELS = {
    "goal": "Goal",
    "budgetTotal": "Budget (US dollars)",
    "gpuType": "GPU type",
    "hours": "GPU hours",
    "deadlineHours": "Deadline (hours from now)",
    "userId": "User",
}
"""The start form's labels (templates/start.html) by the API field each one fills."""


def start_request(form: dict[str, str]) -> tuple[StartRequest | None, list[str]]:
    """The form as the API's body: numbers parsed, blanks left out, then `StartRequest`."""
    body: dict[str, Any] = {}
    for key in ("userId", "goal", "gpuType", *NUMBERS):
        value = form.get(key, "").strip()
        if not value:
            continue
        if key in NUMBERS:
            with contextlib.suppress(ValueError):
                body[key] = float(value)
                continue
        body[key] = value  # a number that did not parse: StartRequest says why
    try:
        return StartRequest.model_validate(body), []
    except ValidationError as exc:
        # the form's own labels, not the API's field names: the user reads the form
        named = [{**e, "loc": [LABELS.get(str(p), p) for p in e["loc"]]} for e in exc.errors()]
        return None, problems(named)


def start_run(store: Store, body: StartRequest) -> Run:
    with store.session() as s:
        run = repo.create_run(
            s,
            user_id=body.user_id,
            goal=body.goal,
            budget_total=body.budget_micros(),
            job_spec=body.job_spec(),
            deadline=body.deadline_at(utcnow()),
        )
    metrics.RUNS_STARTED.inc()
    runlog.run_started(run)
    return run


async def cancel_run(
    store: Store, agent: AgentLoop, run_id: str, *, by: str, lease_s: float
) -> Run:
    """As `POST /api/runs/{id}/cancel`: raises `RunNotFound` or `CannotCancel`. The tick that
    carries it out runs on the agent's loop (`agent`), not the caller's."""
    run = await asyncio.to_thread(request_cancel, store, run_id, by=by, reason="from the dashboard")
    if run.status == RunStatus.running:  # carry it out now if nobody else is ticking it
        owner = f"web-cancel-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(LeaseHeld):
            await agent.tick(run_id, owner, lease_s)

        def reread() -> Run | None:
            with store.session() as s:
                return repo.get_run(s, run_id)

        run = await asyncio.to_thread(reread) or run
    return run
