"""A vendor that sells a minimum number of hours: each payment is recorded for the hours it
bought (the quote's), so the agent renews when those run out, not twice as often; hours beyond
what the job needs are never bought silently, and a vendor selling more than it must is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from procure.agent import slices
from procure.agent.guard import check_quote_hours, check_renewal_hours
from procure.models import ObservationType, PaymentStatus, Quote
from test_slices import sliced
from world import World, drive, start_world, state_of


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """Vendor 2 ($2.10/h, the only one with H100s) sells at least half an hour."""
    w = start_world(
        tmp_path,
        sqlite_url,
        job_seconds=2.0,
        vendor_overrides={"gpu_vendor_2": {"min_hours": 0.5}},
        settings_overrides={"PROCURE_FIRST_SLICE_FRACTION": 0.25},
    )
    yield w
    w.stop()


def _quote(hours: float) -> Quote:
    return Quote(
        quote_id="q", vendor_id="v", gpu_type="A100", hours=hours, price_per_hour=1, amount=1
    )


def test_the_guard_on_a_quotes_hours() -> None:
    assert check_quote_hours(_quote(0.5), 0.25, 1.0, sliced=True) is None  # its minimum
    too_much = check_quote_hours(_quote(2), 0.5, 1, sliced=True)
    assert "more than the 1h the job needs" in str(too_much)
    assert "sells only 0.5h" in str(check_quote_hours(_quote(0.5), 1.0, 1.0, sliced=False))
    assert check_renewal_hours(_quote(0.5), 0.75, 0.5) is None  # within what the job needs
    assert check_renewal_hours(_quote(1.0), 0.5, 1.0) is None  # the minimum it already sold
    refused = check_renewal_hours(_quote(2.0), 0.5, 1.0)
    assert refused is not None and "more than the 0.5h the job still needs" in refused


def test_each_payment_records_the_hours_the_vendor_sold(world: World) -> None:
    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2", 0.25)
    messages = asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    (job,) = state.jobs
    paid = [p for p in state.payments if p.status == PaymentStatus.completed]
    # Asked for a short probe (then 0.25 h slices), sold 0.5 h each time: two payments.
    assert [(p.amount, p.hours) for p in paid] == [(1_050_000, 0.5)] * 2
    assert messages.count("Slice renewed") == 1
    assert "firstSliceHours" not in job.job_params  # not a short slice: a normal one
    payee = world.vendors["gpu_vendor_2"].pay_to
    assert world.chain.balance_of(payee) == 2_100_000  # the job's price, no more
    said = [o.content for o in state.observations if o.type == ObservationType.agent_reasoning]
    assert any("gpu_vendor_2 sells at least 0.5h" in c for c in said)


def test_the_last_slice_beyond_the_job_is_said(world: World) -> None:
    run_id = world.new_run(budget=5.0, gpu_type="H100", hours=0.75)
    deps = world.deps()
    deps.planner = sliced("gpu_vendor_2", 0.25)
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)

    assert state.run.status == "completed"
    paid = [p for p in state.payments if p.status == PaymentStatus.completed]
    assert [p.hours for p in paid] == [0.5, 0.5]  # its minimum, twice: 0.25 h more than needed
    assert sum(p.amount for p in paid) <= state.run.budget_total
    said = [o.content for o in state.observations if o.type == ObservationType.agent_reasoning]
    assert any("0.25h more than the job needs, paid and not run" in c for c in said)


def test_no_short_first_slice_that_leaves_less_than_a_minute() -> None:
    # A 0.02 h job paid at once: a one-minute probe would leave a 12 s payment after it.
    assert slices.first_slice(0.02, None, 0.25) is None
    assert slices.first_slice(0.05, None, 0.25) == slices.MIN_SLICE_HOURS
    assert slices.first_slice(2 / 60, None, 0.25) == slices.MIN_SLICE_HOURS  # a minute after
