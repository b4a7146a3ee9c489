"""What the agent checks in an x402 vendor's quote before paying: a quote
for another GPU type, for fewer hours at the full price, in another currency or already expired
is refused before any money moves, and the run goes on elsewhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from procure.agent.context import PlanContext
from procure.agent.planner import heuristic_planner
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.local import facilitator_client, mock_vendor_config, serve
from procure.models import Action, RunState
from procure.store import repo
from procure.vendors.mock import create_mock_vendor_app
from world import SECRET, World, drive, in_slices, rewriting, start_world, state_of

VENDOR = "gpu_vendor_1"  # the cheaper one, chosen first; gpu_vendor_2 is the honest fallback


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url)
    yield w
    w.stop()


def _quotes_rewritten(world: World, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Serve `VENDOR` (a real mock vendor) with each of its quotes passed through `rewrite`."""
    vendor = world.vendors[VENDOR]
    cfg = mock_vendor_config(vendor, world.facilitator.url, SECRET, job_seconds=8.0)
    app = create_mock_vendor_app(cfg, facilitator_client(world.facilitator.url))
    server = serve(rewriting(app, rewrite, "/quote"))  # type: ignore[arg-type]
    world.servers.append(server)
    with world.store.session() as s:
        repo.save_vendor(s, vendor.model_copy(update={"endpoint": server.url}))


def _paid_to(state: RunState, vendor_id: str) -> list[int]:
    return [
        p.amount
        for p in state.payments
        if p.vendor_id == vendor_id and p.status in ("completed", "pending")
    ]


def _errors(state: RunState) -> list[str]:
    return [o.content for o in state.observations if o.type == "error"]


def _refused_and_done_elsewhere(world: World, evidence: str) -> None:
    """Drive a run (heuristic planner: `VENDOR` first): `VENDOR` is never paid, an error says
    why with `evidence`, and the run completes on gpu_vendor_2."""
    run_id = world.new_run(budget=5.0)  # A100, 1h: both vendors offer it
    asyncio.run(drive(world.deps(), run_id))
    state = state_of(world, run_id)
    assert _paid_to(state, VENDOR) == [], [o.content for o in state.observations]
    assert any(evidence in e for e in _errors(state)), _errors(state)
    assert state.run.status == "completed"
    assert state.jobs[-1].vendor_id == "gpu_vendor_2"


def test_a_quote_for_another_gpu_type_is_refused_before_paying(world: World) -> None:
    """Before the fix: asked for an A100, a vendor quoting an RTX4090 (at an A100's price) was
    paid: check_quote never compared the quote's GPU type with the job's, so the run paid for
    and ran on a GPU it never asked for."""
    _quotes_rewritten(world, lambda q: {**q, "gpuType": "RTX4090"})
    _refused_and_done_elsewhere(world, "RTX4090")


def test_a_quote_for_fewer_hours_at_the_full_price_is_refused_in_slices(world: World) -> None:
    """Before the fix: for a job paid in slices, a vendor quoting a tenth of the slice's hours at
    the whole slice's amount (its price per hour unchanged) was paid: check_quote_hours lets a
    sliced job buy fewer hours, and nothing compared the amount with hours x price, so the run
    paid ten times the vendor's own hourly price (and later renewals were measured against it)."""

    def tenth(q: dict[str, Any]) -> dict[str, Any]:
        return {**q, "hours": q["hours"] / 10}

    _quotes_rewritten(world, tenth)
    run_id = world.new_run(budget=5.0)
    deps = world.deps()

    async def sliced(ctx: PlanContext) -> Action:
        if ctx.cooling_down(ctx.vendor(VENDOR)) or ctx.failures_in_run(VENDOR):  # type: ignore[arg-type]
            return await heuristic_planner(ctx)
        return in_slices(ctx, VENDOR)

    deps.planner = sliced  # type: ignore[assignment]
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)
    assert _paid_to(state, VENDOR) == [], [o.content for o in state.observations]
    assert any("$0.35" in e for e in _errors(state)), _errors(state)
    assert state.run.status == "completed"


def test_a_quote_in_another_currency_is_refused_before_paying(world: World) -> None:
    """Before the fix: a quote of 1.4 "BTC" was paid as $1.40 of the registered USD asset: its
    currency was never read, so the agent paid a figure whose unit it did not know."""
    _quotes_rewritten(world, lambda q: {**q, "currency": "BTC"})
    _refused_and_done_elsewhere(world, "BTC")


def test_an_expired_quote_is_refused_before_paying(world: World) -> None:
    """Before the fix: a quote that had already expired when it came was paid: its expiresAt
    was never read, so the agent paid against terms the vendor no longer stood by."""
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    _quotes_rewritten(world, lambda q: {**q, "expiresAt": past})
    _refused_and_done_elsewhere(world, "expired")


def test_a_renewal_quoted_for_another_gpu_type_is_not_bought(world: World) -> None:
    """Before the fix: a vendor that quoted the job's A100 for its first slice and an RTX4090
    for the next was paid for that next slice: check_renewal never looked at the GPU type."""
    quotes: list[int] = []

    def after_the_first(q: dict[str, Any]) -> dict[str, Any]:
        quotes.append(1)
        return q if len(quotes) == 1 else {**q, "gpuType": "RTX4090"}

    _quotes_rewritten(world, after_the_first)
    run_id = world.new_run(budget=5.0)
    deps = world.deps()

    async def sliced(ctx: PlanContext) -> Action:
        return in_slices(ctx, VENDOR)

    deps.planner = sliced  # type: ignore[assignment]

    async def until_the_first_job_ends() -> list[str]:
        messages: list[str] = []
        deadline = time.monotonic() + 90  # a safety net against a hung test only
        try:
            while not state_of(world, run_id).jobs or state_of(world, run_id).jobs[0].status in (
                "submitted",
                "running",
            ):
                assert time.monotonic() < deadline, messages[-5:]
                messages.append((await tick(deps, run_id)).message)
                await asyncio.sleep(0.05)
        finally:
            await close_deps(deps)
        return messages

    messages = asyncio.run(until_the_first_job_ends())
    state = state_of(world, run_id)
    first = state.jobs[0]
    slices = [p for p in state.payments if p.job_id == first.id and p.status != "failed"]
    assert len(slices) == 1, [(p.amount, p.hours, p.status) for p in slices]
    assert any("RTX4090" in m for m in messages), messages[-5:]
