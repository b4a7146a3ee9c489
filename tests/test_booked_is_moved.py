"""What is booked is what moved: after runs against vendors that charge less than they quoted
(booked at the signed amount) or more (refused, nothing moves), paid whole or in slices, the
store's completed payments to each vendor equal the chain's transfers to it, and each run's
budgetRemaining is its budget less what really left the wallet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from procure.agent.context import PlanContext
from procure.agent.planner import heuristic_planner
from procure.agent.reconcile import settle_ended_runs
from procure.agent.runtime import close_deps
from procure.models import Action
from world import World, drive, start_world, state_of


def whole_or_sliced(vendor_id: str, slice_hours: float | None) -> object:
    """Rent `vendor_id` (whole, or in slices) until it fails this run; then the heuristic."""

    async def plan(ctx: PlanContext) -> Action:
        vendor = ctx.vendor(vendor_id)
        if vendor is None or ctx.failures_in_run(vendor_id) or ctx.cooling_down(vendor):
            return await heuristic_planner(ctx)
        return Action(
            action="start_job",
            vendor_id=vendor_id,
            hours=ctx.remaining_hours,
            slice_hours=slice_hours,
            reason=f"{vendor_id}, {'whole' if slice_hours is None else 'sliced'}",
        )

    return plan


def test_store_matches_chain_per_vendor(tmp_path: Path, db_url: str) -> None:
    # No cool-down: each run meets the over-charging vendor afresh. A payment left in doubt on a
    # loaded machine is resolved once its authorisation's window has passed: 30 s, not 300.
    # In this world an hour of work is 2 s, so a 0.25 h slice lasts half a second and is renewed
    # 0.05 s before it runs out (10% of it, 90 s for a real 15-minute slice). With the mock's
    # default grace (2 s) four runs ticked in one event loop on a loaded machine renewed after
    # the vendor had expired the job, and the run bought fewer slices than this test checks.
    # A job out of paid time waits for its renewal as long as a run may take: what is booked is
    # checked here, not how soon a renewal comes.
    patient = {"grace_seconds": 240.0}
    w = start_world(
        tmp_path,
        db_url,
        job_seconds=2.0,
        vendor_overrides={"gpu_vendor_1": patient, "gpu_vendor_2": patient},
        settings_overrides={"VENDOR_COOLDOWN_S": 0, "PROCURE_PAYMENT_WINDOW_S": 30},
    )
    try:
        _check_runs(w)
    finally:
        w.stop()


async def _settle_doubts(w: World, run_ids: list[str], limit_s: float = 240) -> None:
    """Wait until no payment of the runs is in doubt, settling them as the worker would: on a
    loaded machine a slice's settle answer can come after its tick gave up waiting, and the run
    may end with it pending (used, or expired unused after the 30 s window)."""
    deps = w.deps()
    deadline = time.monotonic() + limit_s
    try:
        while any(p.status == "pending" for r in run_ids for p in state_of(w, r).payments):
            assert time.monotonic() < deadline, "a payment stayed in doubt past its window"
            await settle_ended_runs(deps)
            await asyncio.sleep(0.5)
    finally:
        await close_deps(deps)


def _check_runs(w: World) -> None:
    # Vendor 1 signs for half its quote; vendor 2 asks half as much again as it quoted.
    w.faults("gpu_vendor_1", overcharge_factor=0.5)
    w.faults("gpu_vendor_2", overcharge_factor=1.5)
    plans = [
        ("gpu_vendor_1", None),  # under-charging, whole job
        ("gpu_vendor_1", 0.25),  # under-charging, in slices
        ("gpu_vendor_2", None),  # over-charging: refused, then vendor 1 takes it
        ("gpu_vendor_2", 0.25),
    ]
    run_ids = [w.new_run(budget=5.0) for _ in plans]

    async def drive_all() -> None:
        """The runs side by side (one after another, each would wait out its jobs alone)."""
        drives = []
        for run_id, (vendor_id, slice_hours) in zip(run_ids, plans, strict=True):
            deps = w.deps()
            deps.planner = whole_or_sliced(vendor_id, slice_hours)  # type: ignore[assignment]
            drives.append(drive(deps, run_id, limit_s=240))
        await asyncio.gather(*drives)

    asyncio.run(drive_all())
    asyncio.run(_settle_doubts(w, run_ids))

    states = [state_of(w, r) for r in run_ids]
    assert all(s.run.status == "completed" for s in states)
    sliced_run = states[1]
    slices = [p for p in sliced_run.payments if p.status == "completed"]
    assert len(slices) >= 3, [(p.status, p.hours, p.error_message) for p in sliced_run.payments]
    # Each payment booked at what was signed: half of what was quoted for its hours.
    for p in slices:
        assert p.hours is not None
        assert p.amount == round(1_400_000 * p.hours * 0.5), (p.amount, p.hours)
    # The over-charging vendor's 402s were refused: nothing moved, nothing booked.
    for state in states[2:]:
        refused = [p for p in state.payments if p.vendor_id == "gpu_vendor_2"]
        assert refused and all(p.status == "failed" for p in refused)

    transfers = [t for t in w.chain.transfers() if t["from"] != "0x" + "0" * 40]
    payments = [p for s in states for p in s.payments if p.status == "completed"]
    for vendor in w.vendors.values():
        on_chain = sorted(t["value"] for t in transfers if t["to"] == vendor.pay_to)
        in_store = sorted(p.amount for p in payments if p.vendor_id == vendor.vendor_id)
        assert on_chain == in_store, vendor.vendor_id
    tx_of = {t["tx_hash"] for t in transfers}
    assert all(p.x402_tx_id in tx_of for p in payments)
    for state in states:
        spent = sum(p.amount for p in state.payments if p.status == "completed")
        assert state.run.budget_remaining == state.run.budget_total - spent
