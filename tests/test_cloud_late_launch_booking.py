"""A launch whose answer was lost and that landed after its job ended is booked once, whoever
sweeps it, and at least what the provider billed, even when there is no bill to read."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest

from cloud_fakes import cloud_vendor, drive, make_deps, new_run, new_store, offer
from procure.agent.cloud_sweeper import sweep
from procure.clouds.base import Instance
from procure.models import PaymentStatus, utcnow
from procure.store import repo
from test_cloud_instance_owners import LateLaunch


def _booked(store, run_id: str) -> int:  # type: ignore[no-untyped-def]
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
    assert state is not None
    return sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)


class _LateLaunchOverHttp(LateLaunch):
    """A launch whose answer is lost and that shows in the listing only later; its listing is a
    network call (it yields to the event loop, as httpx does)."""

    async def labelled(self) -> list[Instance]:
        found = await super().labelled()
        await asyncio.sleep(0)  # the answer arrives over the network
        return found


def test_a_late_launch_swept_by_two_workers_is_booked_once(tmp_path: Path) -> None:
    """Before the fix: a launch that landed after its job ended is booked by the sweeper as a new
    completed payment with nothing marking it booked: two workers on one store (several may run)
    that sweep at the same time both list it and both book it, so the run is charged twice."""
    cloud = _LateLaunchOverHttp("runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=30.0)
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 500.0)])
    worker_a = make_deps(store, {"runpod": cloud})
    worker_b = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0)
    asyncio.run(drive(worker_a, run_id, until=lambda: bool(cloud.held)))
    with store.session() as s:
        repo.update_run(s, run_id, cancel_requested_at=utcnow())
    assert asyncio.run(drive(worker_a, run_id)) in ("cancelled", "aborted")
    asyncio.run(cloud.land())
    (late,) = cloud.running()
    deadline = time.monotonic() + 15
    while cloud.total_billed() == 0 and time.monotonic() < deadline:
        asyncio.run(cloud.get(late.id))
        time.sleep(0.02)

    async def both() -> None:
        await asyncio.gather(sweep(worker_a), sweep(worker_b))

    asyncio.run(both())
    assert cloud.running() == []
    billed = cloud.total_billed()
    assert billed > 0
    assert _booked(store, run_id) == billed, (
        f"the provider billed {billed} micro-USD; the run was charged {_booked(store, run_id)}"
    )


def test_a_late_launch_without_a_billing_endpoint_is_booked_at_least_its_bill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: on a provider without a billing endpoint (Lambda), the sweeper books a
    late-landing launch at `computed_bill(record)`, whose window is the record's (launch to the
    job's end, before the instance even showed), not the instance's life up to the sweeper's
    terminate: ten minutes of an unused GPU are billed by the provider and booked as a few
    seconds."""
    cloud = _LateLaunchOverHttp(
        "runpod", [offer("runpod", "A100-dc1", 36.0)], job_s=30.0, bills=False
    )
    now = [time.monotonic()]
    cloud.clock = lambda: now[0]  # the provider's clock, moved by hand
    store = new_store(f"sqlite:///{tmp_path / 'p.db'}", [cloud_vendor("rp", "runpod", 500.0)])
    deps = make_deps(store, {"runpod": cloud})
    run_id = new_run(store, 100.0)
    asyncio.run(drive(deps, run_id, until=lambda: bool(cloud.held)))
    with store.session() as s:
        repo.update_run(s, run_id, cancel_requested_at=utcnow())
    assert asyncio.run(drive(deps, run_id)) in ("cancelled", "aborted")
    asyncio.run(cloud.land())  # it was launched after all
    (late,) = cloud.running()
    now[0] += 1.0
    assert asyncio.run(cloud.get(late.id)).status == "active"  # type: ignore[union-attr]
    now[0] += 600.0  # it runs unnoticed until the next sweep: for procure's clock too
    later = utcnow() + timedelta(seconds=601)
    monkeypatch.setattr("procure.agent.cloud_sweeper.utcnow", lambda: later)

    assert asyncio.run(sweep(deps)) == [late.name]
    billed = cloud.total_billed()
    assert billed >= 5_000_000  # ten minutes at $36/h
    assert _booked(store, run_id) >= billed, (
        f"the provider billed {billed} micro-USD; the run's books say {_booked(store, run_id)}"
    )
