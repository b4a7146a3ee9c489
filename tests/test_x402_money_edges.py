"""The agent's x402 money path against vendors that lie in their settlement answer or about a job's
paid time, and a user's cancel racing a payment: what is booked is what was signed, a cancel
stops new money at once, and a vendor that ran nothing of what it was paid is not paid again."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from procure.agent.cancel import request_cancel
from procure.agent.context import PlanContext
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.local import facilitator_client, mock_vendor_config, serve
from procure.models import Action, JobSpec, Quote
from procure.payments.wallet import load_or_create_account
from procure.store import repo
from procure.vendors.mock import create_mock_vendor_app
from world import SECRET, TERMINAL, World, drive, in_slices, rewriting, start_world, state_of

VENDOR = "gpu_vendor_1"


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url, job_seconds=0.6)
    yield w
    w.stop()


@pytest.fixture
def slow_world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """Jobs of 8 s: a 0.25h slice runs 2 s, time for a renewal to be due and bought."""
    w = start_world(tmp_path, sqlite_url, job_seconds=8.0)
    yield w
    w.stop()


def _only(vendor_id: str) -> Any:
    """A planner that rents `vendor_id` for the whole job, every time."""

    async def plan(ctx: PlanContext) -> Action:
        return Action(
            action="start_job",
            vendor_id=vendor_id,
            hours=ctx.remaining_hours,
            reason=f"{vendor_id} for the whole job",
        )

    return plan


class _UnderReportedSettlement:
    """A vendor that settles honestly but says, in its PAYMENT-RESPONSE, that 1 micro-unit moved."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def lying_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() in (b"payment-response", b"x-payment-response"):
                        answer = json.loads(base64.b64decode(value))
                        answer["amount"] = "1"
                        value = base64.b64encode(json.dumps(answer).encode())
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, lying_send)


def _chain_paid_to(world: World, pay_to: str) -> int:
    return sum(t["value"] for t in world.chain.transfers() if t["to"] == pay_to)


def _chain_paid_by(world: World) -> int:
    """All that left the agent's wallet, as the chain records it."""
    wallet = load_or_create_account(None, world.settings.home).address
    return sum(t["value"] for t in world.chain.transfers() if t["from"] == wallet)


def test_a_vendor_claiming_a_smaller_settled_amount_is_booked_what_was_signed(
    world: World,
) -> None:
    """Before the fix: a vendor's PAYMENT-RESPONSE `amount` is believed over the amount the agent
    itself signed (vendors/client.py `settled_amount`, booked by outcomes.paid_values): a vendor
    that says "1" is booked at one micro-dollar while its whole quote left the wallet, so after it
    fails the run buys the rest elsewhere with money it no longer has: more than budgetTotal is
    spent."""
    vendor = world.vendors[VENDOR]
    cfg = mock_vendor_config(
        vendor, world.facilitator.url, SECRET, job_seconds=0.6, fail_rate=1.0, fail_at=0.47
    )
    app = create_mock_vendor_app(cfg, facilitator_client(world.facilitator.url))
    app.add_middleware(_UnderReportedSettlement)
    server = serve(app)
    world.servers.append(server)
    with world.store.session() as s:
        repo.save_vendor(s, vendor.model_copy(update={"endpoint": server.url}))

    # $1.40 for the whole hour at vendor 1; after it fails at 47%, the rest at vendor 2 would
    # cost about $1.11: more than the $0.60 an honest ledger has left of $2.
    run_id = world.new_run(budget=2.0)
    asyncio.run(drive(world.deps(), run_id))

    state = state_of(world, run_id)
    moved = _chain_paid_by(world)
    booked = sum(p.amount for p in state.payments if p.status == "completed")
    assert moved <= state.run.budget_total, (
        f"the wallet paid {moved} micro-USD on a budget of {state.run.budget_total} "
        f"(the store books {booked}; run {state.run.status})"
    )
    assert booked == moved


def test_a_cancel_requested_while_a_job_is_quoted_pays_nothing(world: World) -> None:
    """Before the fix: a cancel recorded after the tick read the run but before it wrote the
    payment's intent is not seen: submit._intent_conflict checks only `status`, not
    `cancel_requested_at`, so the job is paid for ("No new payment starts", the user was told) and
    cancelled a tick later, its money gone."""
    run_id = world.new_run(budget=5.0)
    deps = world.deps()
    deps.planner = _only(VENDOR)  # type: ignore[assignment]
    quote = deps.vendors.quote

    async def quote_then_user_cancels(vendor: Any, spec: JobSpec, **how: Any) -> Quote:
        answer = await quote(vendor, spec, **how)
        # The user presses Cancel (API, CLI, dashboard) while the quote is in flight.
        request_cancel(world.store, run_id, by="alice", reason="wrong dataset")
        return answer

    deps.vendors.quote = quote_then_user_cancels  # type: ignore[method-assign]

    async def ticks() -> list[str]:
        try:
            return [(await tick(deps, run_id)).message for _ in range(3)]
        finally:
            await close_deps(deps)

    messages = asyncio.run(ticks())
    state = state_of(world, run_id)
    assert state.run.status == "cancelled", messages
    paid = [p for p in state.payments if p.status == "completed"]
    moved = _chain_paid_to(world, world.vendors[VENDOR].pay_to or "")
    assert not paid and moved == 0, (
        f"{messages}: paid {[p.amount for p in paid]} (chain moved {moved}) after the cancel"
    )


def test_a_cancel_requested_while_a_slice_is_quoted_buys_no_slice(
    slow_world: World,
) -> None:
    """Before the fix: the same race on a renewal: renewals._slice_conflict checks the run's
    `status` but not `cancel_requested_at`, so a slice quoted when the user cancels is paid for
    anyway (and not refunded: the job is cancelled on the next tick)."""
    world = slow_world
    run_id = world.new_run(budget=5.0)
    deps = world.deps()

    async def sliced(ctx: PlanContext) -> Action:
        return in_slices(ctx, VENDOR)

    deps.planner = sliced  # type: ignore[assignment]
    quote = deps.vendors.quote
    cancelled: list[bool] = []

    async def quote_then_user_cancels(vendor: Any, spec: JobSpec, **how: Any) -> Quote:
        answer = await quote(vendor, spec, **how)
        if state_of(world, run_id).jobs:  # a renewal's quote, not the first one
            request_cancel(world.store, run_id, by="alice", reason="wrong dataset")
            cancelled.append(True)
        return answer

    deps.vendors.quote = quote_then_user_cancels  # type: ignore[method-assign]

    async def ticks() -> list[str]:
        messages: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        try:
            while state_of(world, run_id).run.status not in TERMINAL and loop.time() < deadline:
                messages.append((await tick(deps, run_id)).message)
                await asyncio.sleep(0.05)
        finally:
            await close_deps(deps)
        return messages

    messages = asyncio.run(ticks())
    state = state_of(world, run_id)
    assert cancelled and state.run.status == "cancelled", messages[-5:]
    paid = [p for p in state.payments if p.status == "completed"]
    assert len(paid) == 1, (
        f"{[m for m in messages if not m.startswith('Job running')]}: "
        f"{len(paid)} payments completed, a slice bought after the cancel was requested"
    )


def _claims_expired(answer: dict[str, Any]) -> dict[str, Any]:
    """A vendor that takes payment for the whole job, then says on every poll that the job's
    paid time ran out (`expired`), at whatever little progress it really made."""
    return {**answer, "status": "expired"} if answer.get("status") == "running" else answer


def test_a_vendor_claiming_its_paid_time_ran_out_at_once_is_not_paid_again(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a vendor paid for the whole hour that says the job `expired` at ~0% is
    believed without penalty (poll.py: `stop_job`, "its paid time ran out"; no failure, no
    cool-down), so the planner picks the same cheapest vendor again and pays it again, until the
    budget is gone and the run ends without the work, which the other vendor would have done."""
    # The grace a seller gets to book a settlement is not what is tested: without it, the lie
    # is acted on at the first poll instead of 30 s later.
    monkeypatch.setattr("procure.agent.outcomes.BOOKING_GRACE_S", 0.0)
    w = start_world(
        tmp_path,
        sqlite_url,
        job_seconds=0.6,
        settings_overrides={"VENDOR_COOLDOWN_S": 600},
    )
    try:
        vendor = w.vendors[VENDOR]
        cfg = mock_vendor_config(vendor, w.facilitator.url, SECRET, job_seconds=600.0)
        app = create_mock_vendor_app(cfg, facilitator_client(w.facilitator.url))
        server = serve(rewriting(app, _claims_expired))  # type: ignore[arg-type]
        w.servers.append(server)
        with w.store.session() as s:
            repo.save_vendor(s, vendor.model_copy(update={"endpoint": server.url}))

        run_id = w.new_run(budget=5.0)
        messages = asyncio.run(drive(w.deps(), run_id))
        state = state_of(w, run_id)
        to_liar = [p for p in state.payments if p.vendor_id == VENDOR and p.status == "completed"]
        assert len(to_liar) == 1, (
            f"{len(to_liar)} payments to {VENDOR}, which ran nothing; run "
            f"{state.run.status}: {state.run.status_reason}; {messages[-4:]}"
        )
        assert state.run.status == "completed"
    finally:
        w.stop()
