"""A vendor that has not proven itself is first paid for a short slice, and the start says so:
a run cancelled moments after its start has spent that short slice, not the whole job; once
half of it has run, the rest is bought as the planner meant; a proven vendor gets no probe."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from procure.agent import slices
from procure.agent.cancel import request_cancel
from procure.agent.start_request import first_payment
from procure.agent.tick import tick
from procure.models import (
    CloudTerms,
    Job,
    JobSpec,
    JobStatus,
    ObservationType,
    PaymentStatus,
    Vendor,
    utcnow,
)
from procure.store import repo
from web_browser import dashboard
from world import World, drive, running_world, state_of


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """No vendor fails; a 1 h job takes 6 s, so the ticks see its short first slice run."""
    with running_world(
        tmp_path,
        sqlite_url,
        job_seconds=6.0,
        settings_overrides={"PROCURE_FIRST_SLICE_FRACTION": 0.25, "VENDOR_TIMEOUT_S": 20.0},
    ) as w:
        yield w


def _job(vendor_id: str, status: JobStatus, start: float, progress: float) -> Job:
    now = utcnow()
    return Job(
        _id=f"j-{vendor_id}-{status}",
        run_id="r",
        vendor_id=vendor_id,
        status=status,
        expected_cost=1,
        idempotency_key="k",
        start_progress=start,
        progress=progress,
        created_at=now,
        updated_at=now,
    )


def test_the_short_first_slice_and_who_is_proven() -> None:
    assert slices.first_slice(1.0, None, 0.25) == 0.25  # paid at once: a quarter of the job
    assert slices.first_slice(1.0, 0.5, 0.25) == 0.125  # in slices: a quarter of one
    assert slices.first_slice(0.05, None, 0.25) == slices.MIN_SLICE_HOURS  # at least a minute
    assert slices.first_slice(1.0, None, 1.0) is None  # switched off
    assert slices.first_slice(1 / 60, None, 0.25) is None  # never more than the job
    fresh = Vendor(
        vendor_id="v",
        name="V",
        endpoint="http://127.0.0.1:1",
        base_price_per_hour=1,
        reliability_score=0.9,
        supported_gpu_types=["A100"],
    )
    assert not slices.proven(fresh, [])
    assert slices.proven(fresh.model_copy(update={"successes": 1}), [])
    assert not slices.proven(fresh, [_job("v", JobStatus.failed, 0.0, 0.4)])  # it failed
    assert slices.proven(fresh, [_job("v", JobStatus.cancelled, 0.25, 0.5)])  # it ran
    assert not slices.proven(fresh, [_job("other", JobStatus.completed, 0.0, 1.0)])


def test_an_unproven_vendor_is_paid_a_short_slice_then_the_rest(world: World) -> None:
    run_id = world.new_run(budget=5.0)
    messages = asyncio.run(drive(world.deps(), run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed" and "Slice renewed" in messages
    (job,) = state.jobs
    first, *rest = [p for p in state.payments if p.status == PaymentStatus.completed]
    normal = job.slice_hours or 1.0
    assert first.hours == pytest.approx(0.25 * (normal if normal < 1 else 1.0))
    assert first.amount == round(1_400_000 * first.hours)
    assert rest and all(p.hours == pytest.approx(min(normal, 1.0 - first.hours)) for p in rest[:1])
    assert sum(p.amount for p in [first, *rest]) == 1_400_000  # the job's price, no more
    said = [o.content for o in state.observations if o.type == ObservationType.agent_reasoning]
    assert any("short first slice" in c and "does not refund" in c for c in said)
    assert any(c.startswith("Renewing gpu_vendor_1") and "short first slice" in c for c in said)

    # It completed a job: proven, so the next run's first payment is the planner's own.
    second = world.new_run(budget=5.0)
    deps = world.deps()

    async def one_tick() -> str:
        try:
            return (await tick(deps, second)).message
        finally:
            from procure.agent.runtime import close_deps

            await close_deps(deps)

    assert asyncio.run(one_tick()) == "Job started"
    (job2,) = state_of(world, second).jobs
    (pay2,) = state_of(world, second).payments
    assert "firstSliceHours" not in job2.job_params
    assert pay2.hours == pytest.approx(job2.slice_hours or 1.0)


def test_a_run_cancelled_moments_after_its_start_spent_only_the_short_slice(world: World) -> None:
    run_id = world.new_run(budget=5.0)
    deps = world.deps()

    async def start_then_cancel() -> list[str]:
        assert (await tick(deps, run_id)).message == "Job started"
        request_cancel(world.store, run_id, by="test", reason="changed my mind")
        return await drive(deps, run_id)

    asyncio.run(start_then_cancel())
    state = state_of(world, run_id)
    assert state.run.status == "cancelled"
    paid = [p for p in state.payments if p.status == PaymentStatus.completed]
    assert [(p.vendor_id, p.amount, p.hours) for p in paid] == [("gpu_vendor_1", 350_000, 0.25)]
    assert state.run.budget_remaining == 5_000_000 - 350_000  # not the whole $1.40
    payee = world.vendors["gpu_vendor_1"].pay_to
    assert world.chain.balance_of(payee) == 350_000


def test_the_start_says_what_the_first_payment_may_be(world: World) -> None:
    with dashboard(world) as server:
        api = httpx.Client(base_url=server.url, timeout=30)
        started = api.post(
            "/api/agent-start", json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}
        )
        assert started.status_code == 201, started.text
        first = started.json()["firstPayment"]
        # Neither vendor has completed a job: a quarter of the 1 h job at the dearer one.
        assert (first["atMost"], first["hours"], first["vendorId"]) == (0.525, 0.25, "gpu_vendor_2")
        assert first["refundable"] is False
        assert "does not refund a paid slice" in first["note"]
        assert "first paid for 25% of its normal first payment" in first["note"]
        assert "at its listed price" in first["note"] and "(0.25 GPU-hours at" in first["note"]

        form = api.get("/runs/new")
        assert form.status_code == 200
        assert 'id="first-payment-amount"' in form.text
        assert "at most about $0.52" in form.text and "does not refund a paid slice" in form.text

        with world.store.session() as s:  # vendor 2 completed a job: it may be paid at once
            repo.record_vendor_outcome(s, "gpu_vendor_2", success=True, gpu_hours=1.0)
        started = api.post(
            "/api/agent-start", json={"userId": "u1", "goal": "Again", "budgetTotal": 5}
        )
        first = started.json()["firstPayment"]
        assert (first["atMost"], first["hours"], first["vendorId"]) == (2.1, 1.0, "gpu_vendor_2")
        # ... but never more than the budget
        started = api.post(
            "/api/agent-start", json={"userId": "u1", "goal": "Small", "budgetTotal": 1}
        )
        assert started.json()["firstPayment"]["atMost"] == 1.0


def test_the_first_payment_counts_a_clouds_first_increment() -> None:
    x402 = Vendor(
        vendor_id="v1",
        name="V1",
        endpoint="http://127.0.0.1:1",
        base_price_per_hour=2_000_000,
        reliability_score=0.9,
        supported_gpu_types=["A100"],
    )
    cloud = Vendor(
        vendor_id="lambda-a100",
        name="Lambda",
        endpoint="cloud:lambda",
        base_price_per_hour=3_000_000,
        reliability_score=0.9,
        supported_gpu_types=["A100"],
        kind="cloud",
        cloud=CloudTerms(provider="lambda", gpu="A100", max_price_per_hour=3_000_000),
    )
    alone = first_payment(JobSpec(gpu_type="A100", hours=4), 100_000_000, [cloud], 0.25)
    assert (alone["atMost"], alone["vendorId"]) == (12.0, "lambda-a100")  # no probe on a cloud
    assert "No registered vendor" not in alone["note"] and "4 GPU-hours at" in alone["note"]
    # 36 s of work: Lambda bills a whole minute, more than the x402 vendor's 36 s.
    short = JobSpec(gpu_type="A100", hours=0.01)
    mixed = first_payment(short, 100_000_000, [x402, cloud], 0.25)
    assert (mixed["atMost"], mixed["vendorId"]) == (0.05, "lambda-a100")
    one = first_payment(JobSpec(gpu_type="A100", hours=4), 100_000_000, [x402], 0.25)
    assert "(1 GPU-hour at v1" in one["note"]  # not "1 GPU-hours"
