"""Checkpoint resume through the real tick, mock vendors and x402 payments on loopback: a failed
job's successor starts from the last checkpoint and is paid only for the work left."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from procure.api.app import create_app
from procure.local import serve
from procure.models import utcnow
from procure.store import repo
from world import World, drive, start_world, state_of


@pytest.fixture
def flaky_world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """Vendor 1 ($1.40/h) always crashes at 47%; vendor 2 ($2.10/h) is steady."""
    w = start_world(
        tmp_path,
        sqlite_url,
        vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0, "fail_at": 0.47}},
        settings_overrides={"VENDOR_COOLDOWN_S": 600},
    )
    yield w
    w.stop()


def test_successor_resumes_from_the_checkpoint_and_costs_less_than_a_restart(
    flaky_world: World,
) -> None:
    run_id = flaky_world.new_run(budget=5.0)
    asyncio.run(drive(flaky_world.deps(), run_id))
    state = state_of(flaky_world, run_id)

    assert state.run.status == "completed" and state.run.progress == 1.0
    failed, finished = state.jobs
    assert (failed.vendor_id, failed.status) == ("gpu_vendor_1", "failed")
    assert failed.checkpoint_progress == 0.25  # checkpoints every 25%; it died at 47%
    assert failed.checkpoint_url and "step=0.25" in failed.checkpoint_url
    assert (finished.vendor_id, finished.status) == ("gpu_vendor_2", "completed")
    assert finished.start_progress == 0.25
    assert finished.job_params["resumeFrom"] == failed.checkpoint_url
    assert finished.job_params["hours"] == 0.75
    logs = [o.content for o in state.observations if o.vendor_id == "gpu_vendor_2"]
    assert f"Resumed from checkpoint {failed.checkpoint_url}" in logs

    # Only the work after the checkpoint is bought again: 0.75h at $2.10, not 1h.
    paid = {p.vendor_id: p.amount for p in state.payments if p.status == "completed"}
    assert paid == {"gpu_vendor_1": 1_400_000, "gpu_vendor_2": 1_575_000}
    restart_from_zero = 1_400_000 + 2_100_000
    assert sum(paid.values()) < restart_from_zero
    assert finished.actual_cost == 1_575_000
    assert flaky_world.chain.balance_of(flaky_world.vendors["gpu_vendor_2"].pay_to) == 1_575_000


def test_the_job_specs_checkpoint_interval_sets_what_is_kept(flaky_world: World) -> None:
    run_id = flaky_world.new_run(budget=5.0, checkpoint_every=0.1)
    asyncio.run(drive(flaky_world.deps(), run_id))
    state = state_of(flaky_world, run_id)
    assert state.run.status == "completed"
    failed, finished = state.jobs
    assert failed.checkpoint_progress == pytest.approx(0.4)  # the last 10% step before 47%
    assert finished.start_progress == pytest.approx(0.4)
    assert [p.amount for p in state.payments] == [1_400_000, 1_260_000]  # 0.6h at $2.10


def test_failure_is_learned_and_cools_the_vendor_down(flaky_world: World) -> None:
    before = utcnow()
    run_id = flaky_world.new_run(budget=5.0)
    messages = asyncio.run(drive(flaky_world.deps(), run_id))
    assert "Waiting" not in messages  # vendor 2 was there: no need to wait out the cool-down
    with flaky_world.store.session() as s:
        v1 = repo.get_vendor(s, "gpu_vendor_1")
        v2 = repo.get_vendor(s, "gpu_vendor_2")
    assert v1 is not None and v2 is not None
    assert (v1.failures, v1.successes, v2.failures, v2.successes) == (1, 0, 0, 1)
    # It ran 47% of a 1-hour job before dying: that is its exposure, for its hazard.
    assert v1.gpu_hours == pytest.approx(0.47, abs=0.01)
    assert v2.gpu_hours == pytest.approx(0.75, abs=0.01)
    # VENDOR_COOLDOWN_S=600: not to be tried again for ten minutes.
    assert v1.cooldown_until is not None
    assert before + timedelta(seconds=590) < v1.cooldown_until < utcnow() + timedelta(seconds=600)
    assert v2.cooldown_until is None


def test_vendors_api_shows_the_learned_hazard(flaky_world: World) -> None:
    run_id = flaky_world.new_run(budget=5.0)
    asyncio.run(drive(flaky_world.deps(), run_id))
    server = serve(create_app(flaky_world.settings, flaky_world.store))
    try:
        vendors = {v["vendorId"]: v for v in httpx.get(f"{server.url}/api/vendors").json()}
    finally:
        server.stop()
    v1, v2 = vendors["gpu_vendor_1"], vendors["gpu_vendor_2"]
    assert v1["failures"] == 1 and v1["gpuHours"] == pytest.approx(0.47, abs=0.01)
    # The registry said 0.90; one failure in under half an hour makes it look worse.
    assert v1["hazardPerHour"] > 0.15 > v2["hazardPerHour"]
    assert v1["learnedReliability"] < 0.9
