"""The agent's x402 payments, a second look: what a vendor says about money it did not take in
the very answer is not believed; what is booked is what moved on the chain."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402.http.utils import encode_payment_response_header
from x402.schemas import SettleResponse

from procure.agent.context import PlanContext
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.local import facilitator_client, mock_vendor_config, serve
from procure.models import Action
from procure.payments.wallet import load_or_create_account
from procure.store import repo
from procure.vendors.mock import create_mock_vendor_app
from world import SECRET, World, drive, in_slices, rewriting, start_world, state_of

VENDOR = "gpu_vendor_1"


def _vendor_behind(world: World, wrap: Any, job_seconds: float) -> Any:
    """The mock vendor `VENDOR`, served behind `wrap` (a hostile layer) and registered at its
    address; the wrapped app, for the test to steer."""
    vendor = world.vendors[VENDOR]
    cfg = mock_vendor_config(vendor, world.facilitator.url, SECRET, job_seconds=job_seconds)
    wrapped = wrap(create_mock_vendor_app(cfg, facilitator_client(world.facilitator.url)))
    server = serve(wrapped)
    world.servers.append(server)
    with world.store.session() as s:
        repo.save_vendor(s, vendor.model_copy(update={"endpoint": server.url}))
    return wrapped


async def _start_at_the_vendor(ctx: PlanContext) -> Action:
    return Action(action="start_job", vendor_id=VENDOR, hours=ctx.remaining_hours, reason="only")


def _one_tick(world: World, run_id: str) -> str:
    """One tick of `run_id`, its planner starting a job at `VENDOR`; its message."""

    async def go() -> str:
        deps = world.deps()
        deps.planner = _start_at_the_vendor  # type: ignore[assignment]
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    return asyncio.run(go())


@pytest.fixture
def slow_world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """Jobs of 8 s: a 0.25h slice runs 2 s, time for renewals to be due and bought."""
    w = start_world(tmp_path, sqlite_url, job_seconds=8.0)
    yield w
    w.stop()


def _wallet_paid(world: World) -> int:
    """All that left the agent's wallet, as the chain records it."""
    wallet = load_or_create_account(None, world.settings.home).address
    return sum(t["value"] for t in world.chain.transfers() if t["from"] == wallet)


def _sliced(ctx: PlanContext) -> Action:
    return in_slices(ctx, VENDOR)


class _LosesPaidRenewalThenLiesOnReplay:
    """A vendor that settles the first paid renewal, loses its answer (a 502), and answers the
    retry (an idempotent replay: nothing is asked, nothing signed) with a PAYMENT-RESPONSE
    saying one micro-unit settled."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.lost = False
        self.lied = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/renew-job":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        signed = b"payment-signature" in headers or b"x-payment" in headers
        start: dict[str, Any] = {}
        body = bytearray()

        async def rewrite(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            status = start["status"]
            replay = any(k.lower() == b"x-idempotent-replay" for k, _ in start.get("headers", []))
            if status == 200 and signed and not self.lost:
                self.lost = True  # settled and started: the answer is lost on the way
                await send({**start, "status": 502, "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            out_headers = list(start.get("headers", []))
            if status == 200 and replay and not self.lied:
                self.lied = True
                claim = SettleResponse(
                    success=True, transaction="0x" + "ab" * 32, network="eip155:1", amount="1"
                )
                out_headers.append(
                    (b"payment-response", encode_payment_response_header(claim).encode())
                )
            out_headers = [(k, v) for k, v in out_headers if k.lower() != b"content-length"]
            out_headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": out_headers})
            await send({"type": "http.response.body", "body": bytes(body)})

        await self.app(scope, receive, rewrite)


def test_a_replayed_slice_is_booked_at_what_moved_not_what_the_vendor_claims(
    slow_world: World,
) -> None:
    """Before the fix: a slice whose paid answer was lost is retried with the same key; the
    vendor replays it (no 402, nothing signed in that call) with a PAYMENT-RESPONSE saying one
    micro-unit settled, and vendors/client.py believes that figure: the store books $0.000001
    while the whole slice left the wallet, so the run's budget shows money it no longer has."""
    world = slow_world
    hostile = _vendor_behind(world, _LosesPaidRenewalThenLiesOnReplay, job_seconds=8.0)
    run_id = world.new_run(budget=5.0)
    deps = world.deps()

    async def plan(ctx: PlanContext) -> Action:
        return _sliced(ctx)

    deps.planner = plan  # type: ignore[assignment]
    asyncio.run(drive(deps, run_id, limit_s=90))

    assert hostile.lost and hostile.lied, "the hostile vendor never got to lie"
    state = state_of(world, run_id)
    booked = sum(p.amount for p in state.payments if p.status == "completed")
    moved = _wallet_paid(world)
    assert booked == moved, (
        f"the store books {booked} micro-USD, the wallet paid {moved}: "
        f"{[(p.amount, p.status, p.x402_tx_id) for p in state.payments]}"
    )


class _RefusesPaymentWithHostileReason:
    """A vendor that answers the paid submission with a 402 whose `error` (what the agent shows
    as the vendor's reason) is 200,000 characters holding a NUL."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        paid = b"payment-signature" in headers or b"x-payment" in headers
        if scope["type"] != "http" or scope["path"] != "/submit-job" or not paid:
            return await self.app(scope, receive, send)
        self.refused += 1
        reason = "declined\x00" + "x" * 200_000
        body = json.dumps({"x402Version": 1, "error": reason, "accepts": []}).encode()
        start_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 402, "headers": start_headers})
        await send({"type": "http.response.body", "body": body})


def test_a_vendors_hostile_refusal_reason_neither_crashes_the_tick_nor_grows_the_store(
    world: World,
) -> None:
    """Before the fix: the reason a vendor gives when it refuses a signed payment (its 402's
    `error`) went unbounded into the payment's error message: on PostgreSQL a NUL in it made the
    tick crash (the payment's fate never recorded, the same crash on every tick), and any store
    kept 200 KB of the vendor's text per payment."""
    hostile = _vendor_behind(world, _RefusesPaymentWithHostileReason, job_seconds=0.6)
    run_id = world.new_run(budget=5.0)
    message = _one_tick(world, run_id)
    assert hostile.refused == 1, message
    [payment] = state_of(world, run_id).payments
    assert payment.status == "pending", message  # signed: in doubt until it expires unused
    error = payment.error_message or ""
    assert "declined" in error and "\x00" not in error
    assert len(error) < 10_000, f"{len(error):,} characters of the vendor's text stored"


class _TransactionClaim:
    """A vendor that settles honestly but names, in its PAYMENT-RESPONSE, a 'transaction' of its
    own: by default 202 characters (no transaction hash is longer than 66)."""

    def __init__(self, app: ASGIApp, claim: str = "0x" + "ab" * 100) -> None:
        self.app = app
        self.claim = claim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def lying_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() in (b"payment-response", b"x-payment-response"):
                        answer = json.loads(base64.b64decode(value))
                        answer["transaction"] = self.claim
                        value = base64.b64encode(json.dumps(answer).encode())
                    headers.append((name, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, lying_send)


def test_a_vendors_overlong_transaction_claim_is_not_booked(world: World) -> None:
    """Before the fix: the `transaction` a vendor names in its PAYMENT-RESPONSE is booked as the
    payment's tx as it comes: 202 characters overflow the 100-character column, so on
    PostgreSQL recording the paid job crashes the tick after the money moved, and SQLite books
    a transaction that is not on the chain."""
    _booked_tx_is_the_chains(world, "0x" + "ab" * 100)


def test_a_vendors_made_up_transaction_hash_is_not_booked(world: World) -> None:
    """Before the fix: a vendor that settles honestly but names a made-up transaction hash (of
    the right shape) in its PAYMENT-RESPONSE gets it booked as the payment's tx: the store's
    record no longer matches the chain's transfer, which an operator reconciles by."""
    _booked_tx_is_the_chains(world, "0x" + "cd" * 32)


def _booked_tx_is_the_chains(world: World, claim: str) -> None:
    _vendor_behind(world, lambda app: _TransactionClaim(app, claim=claim), job_seconds=0.6)
    run_id = world.new_run(budget=5.0)
    assert _one_tick(world, run_id) == "Job started"
    [payment] = state_of(world, run_id).payments
    wallet = load_or_create_account(None, world.settings.home).address
    on_chain = [t["tx_hash"] for t in world.chain.transfers() if t["from"] == wallet]
    assert payment.status == "completed" and [payment.x402_tx_id] == on_chain


def test_a_job_answered_with_another_runs_job_id_is_not_adopted(world: World) -> None:
    """Before the fix: a vendor answering a paid submission with the id of another run's job
    (a mix-up of its own) is believed: the second run polls, renews and reports the first
    run's job as its own (its artifact, another run's model), and cancelling it cancels the
    first run's job."""
    other: list[str] = []  # the first run's job id, once it has one

    def answer_with_the_other(body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "jobId": other[0]} if other else body

    _vendor_behind(
        world, lambda app: rewriting(app, answer_with_the_other, "/submit-job"), job_seconds=30.0
    )
    first, second = world.new_run(budget=5.0), world.new_run(budget=5.0)
    assert _one_tick(world, first) == "Job started"
    [theirs] = state_of(world, first).jobs
    other.append(theirs.vendor_job_id or "")
    message = _one_tick(world, second)
    [ours] = state_of(world, second).jobs
    assert ours.vendor_job_id != theirs.vendor_job_id, message
    assert ours.status != "running", message
    [paid] = state_of(world, second).payments
    assert paid.status == "completed"  # the money moved: it is booked, not forgotten
