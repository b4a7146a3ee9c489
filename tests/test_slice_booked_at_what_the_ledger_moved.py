"""A slice retried after a lost answer is booked at what the ledger says moved for its nonce,
not at what the retry happened to sign: the earlier attempt's authorisation may be the one that
settled, for more."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procure.agent.tick import tick
from procure.models import JobStatus, PaymentStatus
from procure.vendors.client import Submitted
from procure.vendors.protocol import VendorJob
from test_payment_in_doubt_ticks import SLICE, FakeLedger, FakeVendor, _deps, _job, _payment, _store
from world import World, start_world, state_of


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url)
    yield w
    w.stop()


class ReplayingVendor(FakeVendor):
    """Answers the retried renewal as paid, claiming the settlement of what this call signed: a
    sliver, after its 402 asked for one (the retry signs the same nonce again, for that)."""

    def __init__(self, status: VendorJob, signed: int) -> None:
        super().__init__(status)
        self.signed = signed

    async def renew(self, *args: Any, **kwargs: Any) -> Submitted:
        self.calls.append("renew")
        assert self.answer is not None
        return Submitted(self.answer, "0x" + "cd" * 32, self.signed, replayed=False)


def test_retried_slice_is_booked_at_what_its_nonce_moved(world: World) -> None:
    """Before the fix: the retry's own signed amount was booked whenever the answer carried a
    settlement, though the ledger showed the nonce used by the first attempt's authorisation
    for the whole slice: the budget counted 1% of what left the wallet, and the run could spend
    past its budget."""
    run_id = world.new_run(gpu_type="H100")
    job = _job(world, run_id, JobStatus.running, 0.24)
    first = _payment(job, PaymentStatus.completed, 600)
    slice_ = _payment(job, PaymentStatus.pending, 20)  # intent written, answer lost
    _store(world, job, first, slice_)
    ledger = FakeLedger()
    ledger.used.add(slice_.nonce)  # the first attempt's authorisation settled: SLICE moved
    running = VendorJob(job_id="vj-1", status="running", progress=0.245)
    vendor = ReplayingVendor(running, signed=SLICE // 100)
    deps = _deps(world, vendor, ledger)

    message = asyncio.run(tick(deps, run_id)).message
    assert vendor.calls.count("renew") == 1, (message, vendor.calls)
    state = state_of(world, run_id)
    [booked] = [p for p in state.payments if p.id == slice_.id]
    assert booked.status == PaymentStatus.completed, message
    assert booked.amount == SLICE, (message, booked.amount)
    assert state.run.budget_remaining == state.run.budget_total - 2 * SLICE
