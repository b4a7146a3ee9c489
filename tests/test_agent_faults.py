"""The agent against vendors that fail: a budget too small, a vendor down, 500s, garbage, hangs."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from procure.agent.tick import tick
from world import World, drive, start_world, state_of


def test_budget_below_every_quote_aborts_without_paying(world: World) -> None:
    run_id = world.new_run(budget=1.0)  # cheapest vendor wants $1.40
    messages = asyncio.run(drive(world.deps(), run_id))
    assert messages == ["Run aborted"]
    state = state_of(world, run_id)
    assert state.run.status == "aborted"
    assert "No vendor is affordable" in (state.run.status_reason or "")
    assert state.payments == [] and state.jobs == []
    assert state.run.budget_remaining == state.run.budget_total
    assert [t for t in world.chain.transfers() if t["from"] != "0x" + "0" * 40] == []


def test_failed_vendor_cools_down_then_budget_runs_out(tmp_path: Path, sqlite_url: str) -> None:
    # $2.50 covers vendor 1 ($1.40), then vendor 1 again from its checkpoint at 25% ($1.05),
    # but never vendor 2 (even from the checkpoint, $1.575). After vendor 1 fails the agent
    # waits out its cool-down, tries it again, and aborts when money runs out.
    w = start_world(
        tmp_path,
        sqlite_url,
        vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0}},
        settings_overrides={"VENDOR_COOLDOWN_S": 1.0},
    )
    try:
        run_id = w.new_run(budget=2.5)
        messages = asyncio.run(drive(w.deps(), run_id))
        state = state_of(w, run_id)
    finally:
        w.stop()
    assert messages[-1] == "Run aborted"
    assert state.run.status == "aborted"
    assert [(p.vendor_id, p.amount, p.status) for p in state.payments] == [
        ("gpu_vendor_1", 1_400_000, "completed"),
        ("gpu_vendor_1", 1_050_000, "completed"),
    ]
    assert [j.start_progress for j in state.jobs] == [0.0, 0.25]
    assert state.run.budget_remaining == 50_000
    # The cool-down was respected, however slowly the ticks came (on a busy machine the next
    # tick may come after the cool-down, with no "Waiting" between): paid again only after it,
    # and the return says so.
    failed_at = next(o.timestamp for o in state.observations if o.type == "error")
    assert state.payments[1].created_at >= failed_at + timedelta(seconds=1.0)
    back = next(o.content for o in state.observations if o.content.startswith("Returns to"))
    assert "cool-down ended at" in back


@pytest.mark.parametrize(
    "fault",
    [
        {"error500": True},
        {"garbage": True},
        {"hang_seconds": 9.0},  # past the world's 6 s vendor timeout, whatever the load
        {"refuse_capacity": True},
    ],
    ids=["http-500", "garbage-json", "hang", "no-capacity"],
)
def test_broken_vendor_yields_errors_and_run_completes_elsewhere(
    world: World, fault: dict[str, object]
) -> None:
    world.faults("gpu_vendor_1", **fault, endpoints=["quote"])
    run_id = world.new_run()
    asyncio.run(drive(world.deps(), run_id))
    state = state_of(world, run_id)
    assert state.run.status == "completed"
    errors = [o for o in state.observations if o.type == "error"]
    assert errors and all(o.vendor_id == "gpu_vendor_1" for o in errors)
    assert [(j.vendor_id, j.status) for j in state.jobs] == [("gpu_vendor_2", "completed")]
    assert [(p.vendor_id, p.status) for p in state.payments] == [("gpu_vendor_2", "completed")]
    assert state.run.budget_remaining == 5_000_000 - 2_100_000


def test_vendor_that_is_down_is_skipped(world: World) -> None:
    world.vendor_servers["gpu_vendor_1"].stop()
    run_id = world.new_run()
    asyncio.run(drive(world.deps(), run_id))
    state = state_of(world, run_id)
    assert state.run.status == "completed"
    assert any("connection refused" in o.content for o in state.observations if o.type == "error")
    assert [j.vendor_id for j in state.jobs] == ["gpu_vendor_2"]


def test_status_garbage_mid_job_is_retried_not_lost(tmp_path: Path, sqlite_url: str) -> None:
    # A healthy vendor whose job-status briefly answers garbage: errors are recorded, the job
    # is not abandoned, and once answers are sane again the run completes on the same vendor.
    w = start_world(tmp_path, sqlite_url, job_seconds=1.0)
    try:
        run_id = w.new_run()
        deps = w.deps()

        async def scenario() -> None:
            assert (await tick(deps, run_id)).message == "Job started"
            w.faults("gpu_vendor_1", garbage=True, endpoints=["job-status"])
            assert (await tick(deps, run_id)).message == "Vendor error"
            assert (await tick(deps, run_id)).message == "Vendor error"
            w.faults("gpu_vendor_1")
            await drive(deps, run_id)

        asyncio.run(scenario())
        state = state_of(w, run_id)
        assert state.run.status == "completed"
        assert [(j.vendor_id, j.status) for j in state.jobs] == [("gpu_vendor_1", "completed")]
        assert len(state.payments) == 1
        assert sum(1 for o in state.observations if "malformed JSON" in o.content) == 2
    finally:
        w.stop()


def test_a_run_with_no_vendor_registered_says_how_to_register_one(world: World) -> None:
    """Before the fix: with no vendor registered the run aborted with "No vendor offers what the
    job needs: " and nothing after the colon."""
    from sqlalchemy import delete

    from procure.store.tables import VendorRow

    with world.store.session() as s:
        s.execute(delete(VendorRow))
    run_id = world.new_run()
    messages = asyncio.run(drive(world.deps(), run_id))
    state = state_of(world, run_id)
    assert messages == ["Run aborted"] and state.payments == []
    assert "procure vendors seed" in (state.run.status_reason or ""), state.run.status_reason
