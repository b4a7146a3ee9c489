"""The cost-aware planner on hand-built states: what it picks, how it pays, and why."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from procure.agent.context import PlanContext, hazard
from procure.agent.costmodel import Terms, estimate, intervals, long_run_rate
from procure.agent.guard import check_action
from procure.agent.planner import plan_cost_aware, reconsider, stub_planner
from procure.models import Job, JobSpec, JobStatus, Run, RunState, Vendor, usd_to_micros

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def vendor(vid: str, price: str, score: float, **learned: Any) -> Vendor:
    return Vendor(
        vendor_id=vid,
        name=vid.title(),
        endpoint=f"http://{vid}",
        base_price_per_hour=usd_to_micros(price),
        reliability_score=score,
        supported_gpu_types=["A100"],
        **learned,
    )


def context(
    vendors: list[Vendor],
    *,
    hours: float = 8.0,
    budget: str = "100",
    deadline_in: float | None = None,
    jobs: list[Job] | None = None,
    overhead: str = "0.01",
) -> PlanContext:
    run = Run(
        _id="run1",
        user_id="u",
        goal="train",
        status="running",
        budget_total=usd_to_micros(budget),
        budget_remaining=usd_to_micros(budget),
        job_spec=JobSpec(hours=hours, checkpoint_every=0.05),
        deadline=None if deadline_in is None else NOW + timedelta(hours=deadline_in),
        created_at=NOW,
        updated_at=NOW,
    )
    state = RunState(run=run, jobs=jobs or [], payments=[], observations=[])
    return PlanContext(
        state=state, vendors=vendors, now=NOW, payment_overhead=usd_to_micros(overhead)
    )


def failed_job(vid: str, checkpoint: float, hours: float = 8.0) -> Job:
    return Job(
        _id=f"job-{vid}",
        run_id="run1",
        vendor_id=vid,
        status=JobStatus.failed,
        expected_cost=1,
        job_params={"hours": hours, "totalHours": hours},
        idempotency_key=f"key-{vid}",
        checkpoint_url=f"https://ckpt/{vid}?step={checkpoint}",
        checkpoint_progress=checkpoint,
        created_at=NOW,
        updated_at=NOW,
    )


# A cheap vendor that has been seen to fail about every 3 GPU-hours, and a dear steady one.
FLAKY = vendor("flaky", "1.00", 0.95, failures=30, gpu_hours=90.0)
STEADY = vendor("steady", "1.60", 0.99, successes=40, gpu_hours=120.0)


def test_learned_hazard_follows_observed_failures_per_gpu_hour() -> None:
    fresh = vendor("v", "1.00", 0.95)
    burnt = vendor("v", "1.00", 0.95, failures=200, gpu_hours=400.0)
    proven = vendor("v", "1.00", 0.95, successes=50, gpu_hours=400.0)
    assert hazard(burnt) > 0.4 > hazard(fresh) > hazard(proven)
    # Enough data outweighs the registry's claim: close to 200 failures in 400 hours.
    assert hazard(burnt) == pytest.approx(0.5, abs=0.02)


def test_cheap_flaky_vendor_wins_without_a_deadline_and_is_paid_in_slices() -> None:
    action = plan_cost_aware(context([STEADY, FLAKY]))
    assert action.action == "start_job" and action.vendor_id == "flaky"
    # Paying 8 hours up front to a vendor that fails every 3 hours would waste most of it.
    assert action.slice_hours is not None and action.slice_hours < 2.0
    assert check_action(context([STEADY, FLAKY]), action) is None


def test_reliable_vendor_chosen_when_slack_runs_out() -> None:
    roomy = plan_cost_aware(context([FLAKY, STEADY], deadline_in=20))
    tight = plan_cost_aware(context([FLAKY, STEADY], deadline_in=8.4))
    assert roomy.vendor_id == "flaky"
    assert tight.vendor_id == "steady"
    assert "p(miss deadline)" in tight.reason and "deadline in 8.40h" in tight.reason


def test_running_job_moves_to_the_reliable_vendor_when_its_slack_is_gone() -> None:
    job = failed_job("flaky", 0.5).model_copy(update={"status": JobStatus.running})
    # Half done, 4 hours of work left: plenty of time, stay; 4.1 hours left, move at the checkpoint.
    assert reconsider(context([FLAKY, STEADY], deadline_in=12, jobs=[job]), job, 0.5) is None
    reason = reconsider(context([FLAKY, STEADY], deadline_in=4.1, jobs=[job]), job, 0.5)
    assert reason is not None and "to move to steady" in reason


def test_without_a_deadline_a_stand_in_goes_back_to_the_cheaper_vendor_at_a_checkpoint() -> None:
    # A job put on a dearer stand-in while FLAKY cooled down, half done, at a checkpoint where
    # FLAKY is free again. Staying saves a start-up; moving back saves a little over 1% here.
    def move(price: str, deadline_in: float | None) -> str | None:
        stand_in = vendor("stand-in", price, 0.95, failures=30, gpu_hours=90.0)
        job = failed_job("stand-in", 0.5).model_copy(update={"status": JobStatus.running})
        ctx = context([FLAKY, stand_in], jobs=[job], deadline_in=deadline_in, overhead="0.001")
        return reconsider(ctx, job, 0.5)

    reason = move("1.025", None)
    assert reason is not None and "to move to flaky" in reason
    # With a deadline, even one far off, it takes a larger saving to move (its risk is coarse).
    assert move("1.025", 1000) is None
    # No saving beyond the cost of the move itself: stay, deadline or not.
    assert move("1.00", None) is None and move("1.00", 1000) is None


def test_reason_names_the_figures_compared() -> None:
    action = plan_cost_aware(context([FLAKY, STEADY]))
    for figure in ("$1.00/h", "$1.60/h", "failures/h", "expected $", "p(finish)=", "$100.00"):
        assert figure in action.reason


def test_planner_is_deterministic_and_ignores_registry_order() -> None:
    vendors = [FLAKY, STEADY, vendor("mid", "1.30", 0.97, failures=2, gpu_hours=30.0)]
    first = plan_cost_aware(context(vendors, deadline_in=9))
    assert plan_cost_aware(context(vendors, deadline_in=9)) == first
    assert plan_cost_aware(context(list(reversed(vendors)), deadline_in=9)) == first


def test_failed_run_resumes_and_plans_only_the_work_left() -> None:
    ctx = context([FLAKY, STEADY], jobs=[failed_job("flaky", 0.25), failed_job("steady", 0.5)])
    action = plan_cost_aware(ctx)
    assert action.hours == pytest.approx(4.0)
    assert "from the checkpoint at 50%" in action.reason


def test_slices_get_longer_as_payments_get_dearer_and_failures_rarer() -> None:
    def slice_of(v: Vendor, overhead: str) -> float:
        action = plan_cost_aware(context([v], overhead=overhead))
        return action.slice_hours or action.hours or 0.0

    cheap_payments, dear_payments = slice_of(FLAKY, "0.001"), slice_of(FLAKY, "0.20")
    assert cheap_payments < dear_payments
    steadier = vendor("flaky", "1.00", 0.95, failures=3, gpu_hours=90.0)
    assert slice_of(FLAKY, "0.01") < slice_of(steadier, "0.01")


def test_cooling_down_vendor_is_skipped_and_all_cooling_means_wait() -> None:
    later = NOW + timedelta(minutes=5)
    cooling = FLAKY.model_copy(update={"cooldown_until": later})
    assert plan_cost_aware(context([cooling, STEADY])).vendor_id == "steady"
    steady_cooling = STEADY.model_copy(update={"cooldown_until": later})
    waiting = plan_cost_aware(context([cooling, steady_cooling]))
    assert waiting.action == "wait" and "cooling down" in waiting.reason
    # And the guard refuses any planner that picks a cooling vendor anyway.
    ctx = context([cooling, STEADY])
    rogue = plan_cost_aware(context([FLAKY, STEADY]))
    assert rogue.vendor_id == "flaky"
    assert "cooling down" in (check_action(ctx, rogue) or "")


def test_unaffordable_run_aborts_with_the_cheapest_price() -> None:
    action = plan_cost_aware(context([FLAKY, STEADY], budget="5"))
    assert action.action == "abort"
    assert "No vendor is affordable" in action.reason and "$8.00" in action.reason


def test_stub_keeps_the_seeds_rule_cheapest_paid_up_front() -> None:
    action = asyncio.run(stub_planner(context([STEADY, FLAKY])))
    assert (action.vendor_id, action.slice_hours, action.hours) == ("flaky", None, 8.0)


def test_cost_model_without_failures_is_the_list_price_plus_payments() -> None:
    work = intervals(4.0, 0.25, 0.0)
    assert work == [1.0, 1.0, 1.0, 1.0]
    calm = Terms(price_per_hour=1e6, hazard=0.0, payment_overhead=1e4, startup_hours=0.1)
    e = estimate(calm, work, 2, renew_fraction=0.1, redo_rate=2e6)
    assert (e.payments, e.slice_hours, e.p_complete) == (2, 2.0, 1.0)
    assert e.expected == pytest.approx(4e6 + 2e4)
    # An endless job at no hazard costs the price plus one payment per slice.
    rate = long_run_rate(calm, 1.0, 2, renew_fraction=0.1)
    assert rate == pytest.approx(1e6 + 1e4 / 2, rel=1e-3)


def test_cost_model_charges_a_flaky_vendor_for_lost_work_and_unused_time() -> None:
    work = intervals(4.0, 0.25, 0.0)
    flaky = Terms(price_per_hour=1e6, hazard=0.5, payment_overhead=0.0, startup_hours=0.0)
    up_front = estimate(flaky, work, 4, renew_fraction=0.1, redo_rate=1e6)
    sliced = estimate(flaky, work, 1, renew_fraction=0.1, redo_rate=1e6)
    assert up_front.expected > sliced.expected > 4e6
    assert up_front.money_here == pytest.approx(4e6)  # all paid at once, used or not
