"""procure's agent told by a seller that its payment is still being settled (503, then 409, with
Retry-After) waits as asked, with its payment and key, without blaming the vendor: the job starts
once and is paid once, and a payment that never settles is left to the ledger after its window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.local as local
from procure.agent.runtime import close_deps
from procure.agent.tick import AgentDeps, tick
from procure.models import RunState, Vendor
from procure.store import repo
from procure.vendors.client import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    PaymentInDoubt,
    VendorClient,
    parse_retry_after,
)
from procure.vendors.protocol import IDEMPOTENCY_HEADER
from procure.web import views
from procure.web.templating import templates
from test_unknown_settlement import (  # noqa: F401  (flaky_world: a fixture)
    FlakySettle,
    agent_transfers,
    flaky_client,
    flaky_world,
    started,
)
from world import World, drive, start_world, state_of


@dataclass
class Exchange:
    sent: float
    answered: float
    path: str
    key: str | None
    status: int
    retry_after: str | None
    replay: bool


class Wire(httpx.AsyncBaseTransport):
    """The agent's side of its exchanges with the vendors, in order; `before` runs just before
    a request leaves (to let the facilitator settle at a chosen moment)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.log: list[Exchange] = []
        self.before: Callable[[httpx.Request], Awaitable[None]] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.before is not None:
            await self.before(request)
        sent = time.time()
        response = await self.inner.handle_async_request(request)
        key = request.headers.get(IDEMPOTENCY_HEADER) or request.url.params.get("idempotencyKey")
        self.log.append(
            Exchange(
                sent,
                time.time(),
                request.url.path,
                key,
                response.status_code,
                response.headers.get("Retry-After"),
                response.headers.get("X-Idempotent-Replay") == "true",
            )
        )
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def in_doubt(self) -> list[Exchange]:
        return [e for e in self.log if e.status in (409, 503) and e.retry_after is not None]

    def assert_waited(self) -> None:
        """No paid request with a key was sent again before that key's Retry-After was over
        (its status may be read once the ledger shows the payment used: the job is ours)."""
        for told in self.in_doubt():
            wait = float(told.retry_after or 0)
            for later in self.log:
                paid = later.path in ("/submit-job", "/renew-job")
                if paid and later.key == told.key and later.sent >= told.answered:
                    assert later.sent >= told.answered + wait - 1e-3, (told, later)


def set_mode(clients: list[FlakySettle], mode: str) -> None:
    for client in clients:
        client.mode = mode


async def release(world: World, clients: list[FlakySettle]) -> int:
    """The facilitator settles what it was holding, now; how many."""
    done = [await asyncio.to_thread(c.release, world.facilitator.url) for c in clients]
    return sum(done)


def vendor_of(world: World, vendor_id: str) -> Vendor:
    with world.store.session() as s:
        found = repo.get_vendor(s, vendor_id)
    assert found is not None
    return found


def errors(state: RunState) -> list[str]:
    return [o.content for o in state.observations if o.type == "error"]


def assert_not_blamed(world: World, state: RunState, vendor_id: str) -> None:
    vendor = vendor_of(world, vendor_id)
    assert vendor.failures == 0 and vendor.cooldown_until is None
    assert vendor.reliability_score == world.vendors[vendor_id].reliability_score


async def tick_until(
    deps: AgentDeps, run_id: str, done: Callable[[], bool], limit_s: float = 30.0
) -> list[str]:
    """Tick the run until `done()`; the tick messages."""
    messages: list[str] = []
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, f"not done in {limit_s} s: {messages[-5:]}"
        messages.append((await tick(deps, run_id)).message)
        await asyncio.sleep(0.2)
    return messages


def sliced_run(world: World, wire: Wire) -> tuple[str, AgentDeps, str]:
    """A new run paid in quarter-hour slices to gpu_vendor_2, the agent's vendor traffic going
    through `wire`: its id, the agent's deps and wallet address."""
    from test_slices import sliced

    run_id = world.new_run(budget=5.0, gpu_type="H100")
    deps = world.deps(vendor_transport=wire)
    deps.planner = sliced("gpu_vendor_2")
    return run_id, deps, deps.account.address


def doubt_banner(state: RunState) -> str:
    """The run page's banner about its payments in doubt, as a user reads it."""
    d = views.doubts(state, next_check=None, auth_window_s=300)
    module = templates.get_template("_run_live.html").module  # type: ignore[attr-defined]
    html = str(module.summary_block({"run": state.run, "doubts": d, "spent": 0}))
    return " ".join(html.split("<dl")[0].split())


def told_once(state: RunState) -> None:
    """One readable note that the payment is being settled, however often the vendor said so."""
    notes = [o for o in state.observations if "cannot confirm yet" in o.content]
    assert len(notes) == 1 and notes[0].type == "payment_event", notes
    assert "same key" in notes[0].content and "Retry-After" in notes[0].content


def test_settle_answer_held_then_found_used_starts_the_job_once(
    flaky_world: tuple[World, list[FlakySettle]],  # noqa: F811
) -> None:
    world, clients = flaky_world
    set_mode(clients, "held")
    wire = Wire()
    run_id = world.new_run()
    deps = world.deps(vendor_transport=wire)
    address = deps.account.address

    async def scenario() -> None:
        try:
            first = (await tick(deps, run_id)).message
            assert first.startswith("Payment in doubt"), first
            [told] = wire.in_doubt()
            assert told.status == 503 and told.path == "/submit-job"
            state = state_of(world, run_id)
            [payment], [job] = state.payments, state.jobs
            assert (payment.status, job.status) == ("pending", "submitted")
            assert payment.ask_again_at is not None and payment.ask_again_at > payment.created_at
            assert errors(state) == []
            assert_not_blamed(world, state, job.vendor_id)
            # The dashboard says the vendor is settling it, not that it refused it.
            banner = doubt_banner(state)
            assert "still settling it and is asked again after" in banner, banner
            assert "refused" not in banner
            # The money moves at last; the agent, asking again when told, finds its job.
            assert await release(world, clients) == 1
        except BaseException:
            await close_deps(deps)
            raise
        await drive(deps, run_id)

    asyncio.run(scenario())
    state = state_of(world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    paid = agent_transfers(world, address)
    assert len(paid) == started(world) == 1
    [payment] = state.payments
    assert payment.status == "completed" and payment.x402_tx_id == paid[0]["tx_hash"]
    assert payment.amount == paid[0]["value"]
    assert state.run.budget_total - state.run.budget_remaining == paid[0]["value"]
    assert [j.status for j in state.jobs] == ["completed"]
    assert errors(state) == []
    told_once(state)
    assert_not_blamed(world, state, state.jobs[0].vendor_id)
    wire.assert_waited()


def test_seller_answering_409_while_settling_is_waited_out_then_replays(
    flaky_world: tuple[World, list[FlakySettle]],  # noqa: F811
) -> None:
    world, clients = flaky_world
    set_mode(clients, "held")
    wire = Wire()

    async def settle_at_second_retry(request: httpx.Request) -> None:
        # The money moves just before the agent's second retry reaches the seller: that
        # retry is answered with the job, as a replay.
        retries = [e for e in wire.log if e.path == "/submit-job" and e.status == 409]
        if request.url.path == "/submit-job" and retries and clients[0].held + clients[1].held:
            await release(world, clients)

    wire.before = settle_at_second_retry
    run_id = world.new_run()
    deps = world.deps(vendor_transport=wire)
    address = deps.account.address
    asyncio.run(drive(deps, run_id))
    state = state_of(world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    answers = [(e.status, e.replay) for e in wire.log if e.path == "/submit-job"]
    assert (503, False) in answers and (409, False) in answers and answers[-1] == (200, True)
    paid = agent_transfers(world, address)
    assert len(paid) == started(world) == 1
    [payment] = state.payments
    assert payment.status == "completed" and payment.x402_tx_id == paid[0]["tx_hash"]
    assert payment.amount == paid[0]["value"]
    assert [j.status for j in state.jobs] == ["completed"]
    assert errors(state) == []
    told_once(state)
    assert_not_blamed(world, state, state.jobs[0].vendor_id)
    wire.assert_waited()


def test_payment_never_settled_is_left_to_the_ledger_after_its_window(
    flaky_world: tuple[World, list[FlakySettle]],  # noqa: F811
) -> None:
    world, clients = flaky_world
    set_mode(clients, "dropped")
    wire = Wire()
    run_id = world.new_run()
    deps = world.deps(vendor_transport=wire)
    # A short authorisation (the facilitator wants 6 s of it left when it verifies).
    deps.auth_window_s, deps.auth_margin_s = 15, 0.5
    address = deps.account.address

    def first_payment_failed() -> bool:
        payments = state_of(world, run_id).payments
        return bool(payments) and payments[0].status == "failed"

    async def scenario() -> list[str]:
        try:
            messages = await tick_until(deps, run_id, first_payment_failed)
        except BaseException:
            await close_deps(deps)
            raise
        state = state_of(world, run_id)
        [job] = state.jobs
        # Asked again while the authorisation could settle; never blamed for settling slowly.
        assert [e.status for e in wire.in_doubt()][:2] == [503, 409]
        assert all("expired unused" in e for e in errors(state)), errors(state)
        assert_not_blamed(world, state, job.vendor_id)
        assert job.status == "failed" and "expired unused" in (job.error_message or "")
        assert agent_transfers(world, address) == []
        told_once(state)
        set_mode(clients, "ok")  # the next job's payment settles as usual
        return messages + await drive(deps, run_id)

    messages = asyncio.run(scenario())
    assert all(m != "Vendor error" for m in messages), messages
    state = state_of(world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    first, second = state.payments
    assert first.status == "failed" and "expired unused" in (first.error_message or "")
    [moved] = agent_transfers(world, address)
    assert second.status == "completed" and second.x402_tx_id == moved["tx_hash"]
    wire.assert_waited()


def test_renewal_being_settled_is_waited_out_and_paid_once(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    clients: list[FlakySettle] = []
    monkeypatch.setattr(local, "facilitator_client", flaky_client(clients))
    # 6 s a job: a slice runs 1.5 s, and a job at its paid limit waits 6 s for the next one.
    world = start_world(tmp_path, sqlite_url, job_seconds=6.0)
    wire = Wire()

    async def hold_first_renewal(request: httpx.Request) -> None:
        if request.url.path != "/renew-job":
            return
        renewals = [e for e in wire.log if e.path == "/renew-job"]
        if not renewals:  # the first renewal's settle answer goes astray
            set_mode(clients, "held")
        elif any(e.status == 503 for e in renewals) and any(c.held for c in clients):
            await release(world, clients)  # settled before the agent asks again: a replay
            set_mode(clients, "ok")

    wire.before = hold_first_renewal
    try:
        run_id, deps, address = sliced_run(world, wire)
        asyncio.run(drive(deps, run_id))
        state = state_of(world, run_id)
        assert state.run.status == "completed", state.run.status_reason
        answers = [(e.status, e.replay) for e in wire.log if e.path == "/renew-job"]
        assert (503, False) in answers and (200, True) in answers, answers
        paid = agent_transfers(world, address)
        assert len(paid) == started(world) == 4  # the job and its three renewals, once each
        assert [p.status for p in state.payments] == ["completed"] * 4
        assert sorted(p.x402_tx_id or "" for p in state.payments) == sorted(
            t["tx_hash"] for t in paid
        )
        assert errors(state) == []
        told_once(state)
        assert_not_blamed(world, state, "gpu_vendor_2")
        wire.assert_waited()
    finally:
        world.stop()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        (" 45 ", 45.0),
        ("0", 1.0),
        ("-5", 1.0),
        ("999999999999", MAX_RETRY_AFTER_S),
        ("9" * 5000, DEFAULT_RETRY_AFTER_S),
        ("Wed, 21 Oct 2026 07:28:00 GMT", DEFAULT_RETRY_AFTER_S),
        ("2.5", DEFAULT_RETRY_AFTER_S),
        ("soon", DEFAULT_RETRY_AFTER_S),
        ("", DEFAULT_RETRY_AFTER_S),
        (None, DEFAULT_RETRY_AFTER_S),
    ],
)
def test_retry_after_is_read_within_bounds(header: str | None, seconds: float) -> None:
    assert parse_retry_after(header) == seconds


@pytest.mark.parametrize(
    ("status", "retry_after", "in_doubt"),
    [(503, "7", True), (409, "3", True), (503, None, False), (409, None, False), (500, "7", False)],
)
def test_only_503_or_409_with_retry_after_on_a_paid_call_is_in_doubt(
    status: int, retry_after: str | None, in_doubt: bool
) -> None:
    """A seller's 'still being settled' is told apart from its other answers, which keep their
    old meaning (a 5xx to retry, a 409 turned down)."""

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"Retry-After": retry_after} if retry_after else {}
        body = httpx.ByteStream(b'{"error": "still being settled"}')  # streamed, as on a socket
        return httpx.Response(status, headers=headers, stream=body)

    async def call() -> Exception:
        client = VendorClient(transport=httpx.MockTransport(answer))
        vendor = Vendor(
            vendor_id="v",
            name="v",
            endpoint="http://127.0.0.1:9",
            base_price_per_hour=1,
            reliability_score=0.9,
            supported_gpu_types=["A100"],
        )
        try:
            await client.submit(vendor, "q", idempotency_key="k", job_params={}, payer=_no_payer())
        except Exception as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("no error raised")

    exc = asyncio.run(call())
    assert isinstance(exc, PaymentInDoubt) == in_doubt, exc
    if in_doubt:
        assert isinstance(exc, PaymentInDoubt)
        assert exc.retry_after_s == float(retry_after or 0) and not exc.payment_sent
        assert "still being settled" in str(exc)
        assert exc.retryable == (status == 503)


def _no_payer() -> Any:
    from x402 import x402Client

    return x402Client()
