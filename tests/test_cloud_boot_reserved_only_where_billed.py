"""A run renting on a cloud reserves the boot only where the provider bills it (its client's
`bills_boot`): on Lambda, which bills from the end of the boot, a budget too small for the boot
timeout and a stretch ahead still rents, and its money never goes past the budget, however long
the boot or the job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cloud_fakes import FakeCloud, cloud_vendor, make_deps, new_run, new_store, offer, tmp_url
from procure.agent.tick import tick
from procure.models import TERMINAL_RUN_STATUSES, PaymentStatus
from procure.store import cloud_repo, repo

PER_SECOND = 3600.0  # $1 a second, billed by the second: the budget is so many seconds
BUDGET_USD = 7.0  # less than the boot timeout (5 s) and the stretch ahead (4 s): $9


def _cloud(provider: str, *, bills_boot: bool, job_s: float, boot_s: float = 1.0) -> FakeCloud:
    cloud = FakeCloud(
        provider,
        [offer(provider, "gpu_1x_a100", PER_SECOND)],
        boot_s=boot_s,
        job_s=job_s,
        bills=False,
    )
    cloud.bills_boot = bills_boot  # type: ignore[attr-defined]
    return cloud


async def _drive_within_budget(deps, run_id: str, budget: int) -> str:  # type: ignore[no-untyped-def]
    """Tick the run to its end, checking after every tick that what is paid and reserved for
    it stays within its budget; its status."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        await tick(deps, run_id)
        with deps.store.session() as s:
            state = repo.load_state(s, run_id, observations=False)
        assert state is not None
        held = [
            p
            for p in state.payments
            if p.status in (PaymentStatus.pending, PaymentStatus.completed)
        ]
        assert sum(p.amount for p in held) <= budget
        if state.run.status in TERMINAL_RUN_STATUSES:
            return str(state.run.status)
        await asyncio.sleep(0.02)
    raise AssertionError("the run did not end in 40s")


def _booked(store, run_id: str) -> int:  # type: ignore[no-untyped-def]
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    assert not [p for p in state.payments if p.status == PaymentStatus.pending]
    return sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)


def test_a_lambda_boot_longer_than_the_budget_pays_for_is_not_reserved(tmp_path: Path) -> None:
    """Before the fix: the run reserved the boot timeout's cost ($5) and a stretch ahead ($2) on
    Lambda, which does not bill the boot, and failed at once: "raise the budget to rent it",
    while $4 pays for the job (under a second of billed time) many times over. (Had only that
    first reservation changed, the reservation kept ahead of the instance still counted its
    boot, 3.5 s, from its launch: the budget stopped the instance before it ever booted.)"""
    cloud = _cloud("lambda", bills_boot=False, job_s=0.5, boot_s=3.5)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("la", "lambda", 5000.0)])
    deps = make_deps(store, {"lambda": cloud}, boot_timeout_s=5.0, reserve_ahead_s=2.0)
    run_id = new_run(store, 4.0, hours=0.001)
    status = asyncio.run(_drive_within_budget(deps, run_id, 4_000_000))
    with store.session() as s:
        said = [o.content for o in repo.load_state(s, run_id).observations]  # type: ignore[union-attr]
    assert status == "completed", said[-5:]
    assert cloud.total_billed() <= _booked(store, run_id) <= 4_000_000


def test_a_lambda_run_whose_job_outlasts_the_budget_stops_within_it(tmp_path: Path) -> None:
    """Before the fix: failed at once ($9 to reserve, $7 of budget). After: the boot is not
    reserved, the work is: the instance is stopped before its billed time passes the budget,
    and what is booked covers what it billed and stays within the budget."""
    cloud = _cloud("lambda", bills_boot=False, job_s=600.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("la", "lambda", 5000.0)])
    deps = make_deps(store, {"lambda": cloud}, boot_timeout_s=5.0, reserve_ahead_s=4.0)
    budget = round(BUDGET_USD * 1_000_000)
    run_id = new_run(store, BUDGET_USD, hours=0.001)
    asyncio.run(_drive_within_budget(deps, run_id, budget))
    with store.session() as s:
        (inst,) = cloud_repo.instances_of_run(s, run_id)
    assert inst.active_at is not None, "the instance never ran"
    assert cloud.running() == []
    assert 0 < cloud.total_billed() <= _booked(store, run_id) <= budget


def test_a_provider_billing_the_boot_still_reserves_it(tmp_path: Path) -> None:
    """Where the client says it bills the boot (RunPod, Vast.ai), the boot timeout stays
    reserved: the same budget is too small there, and the run says so at once."""
    cloud = _cloud("runpod", bills_boot=True, job_s=0.5)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 5000.0)])
    deps = make_deps(store, {"runpod": cloud}, boot_timeout_s=5.0, reserve_ahead_s=4.0)
    run_id = new_run(store, BUDGET_USD, hours=0.001)
    status = asyncio.run(_drive_within_budget(deps, run_id, round(BUDGET_USD * 1_000_000)))
    with store.session() as s:
        run = repo.get_run(s, run_id)
    assert run is not None and status == "failed"
    assert "raise the budget" in (run.status_reason or "") and cloud.launches == 0
