"""Pay as you go through the real tick, mock vendors and x402 on loopback: each slice is its own
payment; a failure loses only the slice it happened in; paid time that runs out stops the job at
its checkpoint, and the next job resumes there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procure.agent.context import PlanContext
from procure.agent.planner import heuristic_planner
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.models import Action, Job
from procure.payments.payer import payment_nonce
from procure.vendors.client import PaymentRefused, VendorClient, VendorError
from world import World, drive, start_world, state_of


def sliced(vendor_id: str, slice_hours: float = 0.25) -> Any:
    """A planner that rents `vendor_id` in slices for as long as it has not failed this run,
    and leaves the rest to the heuristic."""

    async def plan(ctx: PlanContext) -> Action:
        if ctx.failures_in_run(vendor_id) or ctx.cooling_down(ctx.vendor(vendor_id)):  # type: ignore[arg-type]
            return await heuristic_planner(ctx)
        return Action(
            action="start_job",
            vendor_id=vendor_id,
            hours=ctx.remaining_hours,
            slice_hours=slice_hours,
            reason=f"{vendor_id} in slices of {slice_hours}h",
        )

    return plan


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """Vendor 1 ($1.40/h) crashes at 47%; vendor 2 ($2.10/h, the only one with H100s) does not.
    A job takes 2 seconds, so that ticks see every slice."""
    w = start_world(
        tmp_path,
        sqlite_url,
        job_seconds=2.0,
        vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0, "fail_at": 0.47}},
        # The slices' own mechanics: no short first slice (tests/test_first_slice.py has it).
        settings_overrides={"VENDOR_COOLDOWN_S": 600, "PROCURE_FIRST_SLICE_FRACTION": 1.0},
    )
    yield w
    w.stop()


def test_each_slice_is_paid_separately(world: World) -> None:
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2")
    messages = asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    assert messages.count("Slice renewed") == 3
    (job,) = state.jobs
    assert job.slice_hours == 0.25 and job.actual_cost == 2_100_000
    payments = state.payments
    assert [(p.status, p.amount, p.hours) for p in payments] == [("completed", 525_000, 0.25)] * 4
    assert all(p.nonce == payment_nonce(p.id) for p in payments)
    assert len({p.x402_tx_id for p in payments}) == 4
    # Four separate settlements reached the vendor's payee, together the job's price.
    payee = world.vendors["gpu_vendor_2"].pay_to
    to_payee = [t for t in world.chain.transfers() if t["to"] == payee]
    assert [t["tx_hash"] for t in to_payee] == [p.x402_tx_id for p in payments]
    assert world.chain.balance_of(payee) == 2_100_000
    assert state.run.budget_remaining == 5_000_000 - 2_100_000


def test_a_job_paid_in_tenths_completes(world: World) -> None:
    """Before the fix: ten slices of 0.1 h add up to 0.9999999999999999 h in floating point, so
    the mock vendor's job stopped a hair short of done and reported "running (100%)" for ever
    (the agent would have failed it as stalled and paid again elsewhere)."""
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2", slice_hours=0.1)
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    assert [(p.status, p.hours) for p in state.payments] == [("completed", 0.1)] * 10


def test_a_vendor_raising_its_price_mid_job_is_not_renewed_at_the_new_price(
    world: World,
) -> None:
    """Before the fix: a renewal was checked only against the money left, so a vendor that
    tripled its price after the first slice was paid the new price, slice after slice, without
    the planner ever comparing it with anyone (helper-91's finding)."""
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2")

    async def reprice_after_the_first_slice() -> list[str]:
        deadline = time.monotonic() + 60
        while not any(p.status == "completed" for p in state_of(world, run_id).payments):
            assert time.monotonic() < deadline, "the first slice was never paid"
            await tick(deps, run_id)
        world.faults("gpu_vendor_2", reprice_factor=3.0)
        messages: list[str] = []
        while state_of(world, run_id).jobs[0].status in ("submitted", "running"):
            assert time.monotonic() < deadline + 60, f"the first job never ended: {messages}"
            messages.append((await tick(deps, run_id)).message)
        await close_deps(deps)
        return messages

    messages = asyncio.run(reprice_after_the_first_slice())
    state = state_of(world, run_id)

    first = state.jobs[0]
    rates = [p.amount / p.hours for p in state.payments if p.job_id == first.id and p.hours]
    assert rates and max(rates) == 2_100_000, rates  # $2.10/h, never the tripled price
    assert any("raised its price from $2.10/h to $6.30/h" in m for m in messages), messages


def test_a_vendor_charging_less_than_it_quoted_is_renewed_at_its_quote(world: World) -> None:
    """Before the fix: a renewal was compared with what the earlier slices cost, so a vendor that
    signed for half its quote looked, at its next quote, like one that doubled its price: no
    renewal was ever bought, and each slice's job ran out its paid time and started again."""
    world.faults("gpu_vendor_2", overcharge_factor=0.5)  # signs for half of what it quotes
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2")
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    assert len(state.jobs) == 1, [j.status for j in state.jobs]  # renewed, never restarted
    assert len([p for p in state.payments if p.status == "completed"]) >= 2
    assert not any("raised its price" in o.content for o in state.observations)


def test_a_failure_loses_only_the_current_slice(world: World) -> None:
    run_id = world.new_run(budget=5.0)
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_1")
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    failed, finished = state.jobs
    assert (failed.vendor_id, failed.status) == ("gpu_vendor_1", "failed")
    # It died at 47%, inside its second quarter-hour slice: two slices were bought, not the
    # whole hour; of those, the work up to the checkpoint at 25% was kept.
    on_v1 = [p.amount for p in state.payments if p.job_id == failed.id]
    assert on_v1 == [350_000, 350_000]
    lost = sum(on_v1) - round(0.25 * 1_400_000)
    assert lost == 350_000  # one slice
    assert finished.start_progress == 0.25 and finished.vendor_id == "gpu_vendor_2"
    on_v2 = sum(p.amount for p in state.payments if p.job_id == finished.id)
    assert on_v2 == 1_575_000


class _LosesFirstRenewAnswer:
    """The vendor settles the first renewal, but its answer never reaches the agent."""

    def __init__(self, inner: VendorClient) -> None:
        self.inner = inner
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.inner.renew(*args, **kwargs)
        if not self.lost:
            self.lost += 1
            raise VendorError("renew-job: timed out", payment_sent=True)
        return result


def test_a_slice_whose_answer_was_lost_is_paid_once(world: World) -> None:
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2")
    deps.vendors = _LosesFirstRenewAnswer(deps.vendors)  # type: ignore[assignment]
    messages = asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert "Vendor error" in messages and state.run.status == "completed"
    assert [(p.status, p.amount) for p in state.payments] == [("completed", 525_000)] * 4
    payee = world.vendors["gpu_vendor_2"].pay_to
    assert world.chain.balance_of(payee) == 2_100_000  # the retried slice settled once
    assert len({p.x402_tx_id for p in state.payments}) == 4


class _RefusesRenewalsOf:
    """Every renewal of the first job is refused before anything is signed."""

    def __init__(self, inner: VendorClient) -> None:
        self.inner = inner
        self.first: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def renew(self, vendor: Any, vendor_job_id: str, *args: Any, **kwargs: Any) -> Any:
        self.first = self.first or vendor_job_id
        if vendor_job_id == self.first:
            raise PaymentRefused("402 asks too much (test)")
        return await self.inner.renew(vendor, vendor_job_id, *args, **kwargs)


def test_paid_time_running_out_stops_the_job_and_the_next_resumes(world: World) -> None:
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2")
    deps.vendors = _RefusesRenewalsOf(deps.vendors)  # type: ignore[assignment]
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    stopped, finished = state.jobs
    assert stopped.status == "cancelled"
    assert "paid time ran out" in (stopped.error_message or "")
    assert stopped.checkpoint_progress == 0.25 and finished.start_progress == 0.25
    done = [p for p in state.payments if p.status == "completed"]
    assert sum(p.amount for p in done) == 2_100_000  # nothing bought twice
    first, *refused = [p for p in state.payments if p.job_id == stopped.id]
    assert first.status == "completed" and refused
    assert all(p.status == "failed" for p in refused)


def test_reconsider_moves_a_running_job_at_its_paid_checkpoint(world: World) -> None:
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2")
    moved: dict[str, float] = {}

    def move_first_job(ctx: PlanContext, job: Job, paid_until: float) -> str | None:
        if moved and job.id not in moved:
            return None
        moved.setdefault(job.id, paid_until)
        return "testing a move"

    deps.reconsider = move_first_job
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)
    assert state.run.status == "completed"
    first, second = state.jobs
    assert list(moved.values()) == [0.25]
    assert first.status == "cancelled" and "testing a move" in (first.error_message or "")
    assert second.start_progress == 0.25
    assert sum(p.amount for p in state.payments if p.status == "completed") == 2_100_000
