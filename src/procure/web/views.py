"""What each page shows, read from the store in one transaction (plain sync functions: the
routes run them in a thread so the event loop, shared with the worker, never waits on them)."""

from __future__ import annotations

from typing import Any

from procure.agent.context import hazard, reliability
from procure.models import (
    TERMINAL_RUN_STATUSES,
    ObservationType,
    PaymentStatus,
    RunState,
    RunStatus,
    utcnow,
)
from procure.store import Store, repo
from procure.store.keyset import Key
from procure.web import charts, queries

PER_PAGE = 25
TIMELINE = 300
"""Observations the run page shows at first; the live stream carries on after the last."""
STATUSES = [s.value for s in RunStatus]
KIND = {
    ObservationType.agent_reasoning: "reasoning",
    ObservationType.llm_response: "reasoning",
    ObservationType.payment_event: "payment",
    ObservationType.error: "error",
    ObservationType.job_event: "job",
    ObservationType.job_log: "log",
}


def runs(
    store: Store,
    status: str | None,
    *,
    before: Key | None = None,
    after: Key | None = None,
    oldest: bool = False,
) -> dict[str, Any]:
    """The runs page: the newest, or the page beside a cursor, or the oldest (keyset)."""
    with store.session() as s:
        found = queries.runs_page(
            s, status=status, per_page=PER_PAGE, before=before, after=after, oldest=oldest
        )
        counts = repo.count_runs_by_status(s)
    return {"page": found, "status": status, "statuses": STATUSES, "counts": counts}


def summary(state: RunState) -> dict[str, Any]:
    """The parts of a run page that change as it advances (also sent live)."""
    run = state.run
    spent = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
    end = run.updated_at if run.status in TERMINAL_RUN_STATUSES else utcnow()
    end = max(end, *(p.updated_at for p in state.payments), run.created_at)
    return {
        "run": run,
        "jobs": state.jobs,
        "payments": state.payments,
        "spent": spent,
        "ended": run.status in TERMINAL_RUN_STATUSES,
        "burn": charts.budget_burn(run.budget_total, state.payments, run.created_at, end),
        "progress_chart": charts.progress(state.jobs, run.created_at, end),
    }


def run(store: Store, run_id: str) -> dict[str, Any] | None:
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        if state is None:
            return None
        observations = queries.latest_observations(s, run_id, TIMELINE)
    shown = summary(state)
    return {
        **shown,
        "summary": shown,
        "observations": observations,
        "kind": KIND,
        "cursor": observations[-1].id if observations else 0,
    }


def run_state(store: Store, run_id: str) -> RunState | None:
    with store.session() as s:
        return repo.load_state(s, run_id, observations=False)


def vendors(store: Store) -> list[dict[str, Any]]:
    with store.session() as s:
        listed = repo.list_vendors(s)
    now = utcnow()
    return [
        {
            "vendor": v,
            "learned": reliability(v),
            "hazard": hazard(v),
            "cooling": v.cooldown_until is not None and v.cooldown_until > now,
        }
        for v in listed
    ]
