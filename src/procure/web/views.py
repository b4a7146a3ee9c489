"""What each page shows, read from the store in one transaction (plain sync functions: the
routes run them in a thread so the event loop, shared with the worker, never waits on them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from procure.agent.context import hazard, reliability
from procure.agent.start_request import first_payment as first_payment_of
from procure.models import (
    TERMINAL_RUN_STATUSES,
    JobSpec,
    ObservationType,
    PaymentStatus,
    RunState,
    RunStatus,
    Vendor,
    budget_to_micros,
    utcnow,
)
from procure.payments.payer import authorization_deadline
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


def doubts(
    state: RunState, *, next_check: datetime | None, auth_window_s: float | None
) -> list[dict[str, Any]]:
    """The run's payments whose fate is not known yet (signed, then refused or unanswered):
    what the run waits for, from the store alone. `next_check`: when a worker next ticks the
    run; `auth_window_s`: how long an authorisation stays valid (None: not said)."""
    found = []
    for p in state.payments:
        if p.status != PaymentStatus.pending or p.reserves_cloud:
            continue  # a cloud reservation is booked from the provider's bill, not reconciled
        expires = None
        if auth_window_s is not None:
            valid_before = authorization_deadline(p.created_at, auth_window_s)
            expires = datetime.fromtimestamp(valid_before, UTC)
        found.append(
            {
                "payment": p,
                "since": p.created_at,  # when it was signed
                # a vendor still settling it asked for time: not a refusal
                "refused": bool(p.error_message) and p.ask_again_at is None,
                "settling_until": p.ask_again_at,
                "why": (p.error_message or "").removeprefix("refused: "),
                "expires": expires,
                "next_check": next_check,
                # no worker has it due later (ticked by hand, or a worker is late): say so
                "next_check_due": next_check is not None and next_check <= utcnow(),
            }
        )
    return found


def summary(
    state: RunState,
    *,
    next_check: datetime | None = None,
    auth_window_s: float | None = None,
) -> dict[str, Any]:
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
        "doubts": doubts(state, next_check=next_check, auth_window_s=auth_window_s),
    }


def run(store: Store, run_id: str, *, auth_window_s: float | None = None) -> dict[str, Any] | None:
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        if state is None:
            return None
        observations = queries.latest_observations(s, run_id, TIMELINE)
        next_check = queries.next_tick_at(s, run_id)
    shown = summary(state, next_check=next_check, auth_window_s=auth_window_s)
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


def first_payment(form: dict[str, str], vendors: list[Vendor], fraction: float) -> dict[str, Any]:
    """The start form's word on the first payment, for the values in the form (its defaults
    until the user sends others; a value that does not parse counts as the default)."""

    def number(key: str, default: float, low: float, high: float) -> float:
        try:
            value = float(form.get(key) or default)
        except ValueError:
            return default
        return value if low <= value <= high else default

    gpu = (form.get("gpuType") or "A100").strip()[:64] or "A100"
    spec = JobSpec(gpu_type=gpu, hours=number("hours", 1.0, 1 / 60, 720))
    budget = budget_to_micros(number("budgetTotal", 5.0, 0.000001, 1_000_000))
    return first_payment_of(spec, budget, vendors, fraction)
