"""The heuristic planner's "No vendor is affordable" reason shows the cost it compared with the
budget left, readably above it, and never a cost it did not compare."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from procure.agent.context import PlanContext
from procure.agent.planner import plan_cost_aware
from procure.models import Job, JobSpec, JobStatus, Run, RunState, Vendor

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _vendor(price_micros: int) -> Vendor:
    return Vendor(
        vendor_id="only",
        name="Only",
        endpoint="http://only",
        base_price_per_hour=price_micros,
        reliability_score=0.95,
        supported_gpu_types=["A100"],
    )


def _context(
    vendor: Vendor, hours: float, budget: int, jobs: list[Job] | None = None
) -> PlanContext:
    run = Run(
        _id="run1",
        user_id="u",
        goal="train",
        status="running",
        budget_total=budget,
        budget_remaining=budget,
        job_spec=JobSpec(hours=hours, checkpoint_every=0.25),
        created_at=NOW,
        updated_at=NOW,
    )
    state = RunState(run=run, jobs=jobs or [], payments=[], observations=[])
    return PlanContext(state=state, vendors=[vendor], now=NOW, payment_overhead=10_000)


def _figures(reason: str) -> tuple[float, float]:
    found = re.search(r"costs \$([\d,.]+) and \$([\d,.]+) is left", reason)
    assert found is not None, reason
    cost, left = (float(x.replace(",", "")) for x in found.groups())
    return cost, left


def test_a_cost_a_fraction_of_a_cent_over_the_budget_reads_above_it() -> None:
    """Before the fix: a cost 0.44 cents above the budget left was shown to the cent like it:
    "the cheapest, only, costs $24.47 and $24.47 is left", a run aborted for a cost it could
    seemingly pay."""
    vendor = _vendor(3_543_996)  # $3.543996/h for 6.9058... hours: 24,474,396 micro-USD
    ctx = _context(vendor, hours=24_474_396 / 3_543_996, budget=24_470_000)
    action = plan_cost_aware(ctx)
    assert action.action == "abort" and action.reason.startswith("No vendor is affordable")
    cost, left = _figures(action.reason)
    assert cost > left
    assert left == 24_470_000 / 1e6  # what is left, exactly as it is


def test_a_run_with_nothing_left_to_price_shows_no_cost() -> None:
    """Before the fix: a run whose furthest checkpoint is at 100% (its job lost after saving
    it) had no work for the planner to price, yet was told "the cheapest, only, costs $0.00
    and $50.00 is left": a cost below the budget left that nothing compared."""
    saved = Job(
        _id="job1",
        run_id="run1",
        vendor_id="only",
        status=JobStatus.failed,
        expected_cost=1,
        job_params={"hours": 2.0, "totalHours": 2.0},
        idempotency_key="key1",
        checkpoint_url="https://ckpt/run1?step=1.0",
        checkpoint_progress=1.0,
        created_at=NOW,
        updated_at=NOW,
    )
    ctx = _context(_vendor(1_000_000), hours=2.0, budget=50_000_000, jobs=[saved])
    action = plan_cost_aware(ctx)
    assert action.action == "abort"
    assert "$0.00" not in action.reason and "costs" not in action.reason, action.reason
    assert "no work is left after the checkpoint at 100%" in action.reason
