"""A payment whose settlement outcome is unknown (the facilitator settles, but its answer never
reaches the seller in time) is never dropped: the gateway books the money that moved and runs
the job, once; the mock vendor starts every job it was paid for; an authorisation that never
settles is released after its window, and a facilitator's definite refusal leaves no trace."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.schemas import SettleResponse

import procure.gateway.serve as gateway_serve
import procure.local as local
from procure.gateway import book
from procure.gateway import loop as gateway_loop
from procure.models import usd_to_micros
from procure.payments.settlements import Settlement, SettlementLookupError
from procure.store.gateway_tables import GatewayPaymentRow
from procure.vendors.doubt import Doubt, Doubts
from test_gateway import (
    TRAIN,
    GatewayWorld,
    buyer,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)
from world import World, drive, start_world, state_of

ZERO = "0x" + "0" * 40


class FlakySettle:
    """An x402 facilitator client whose settle answers go astray, as on a loaded machine:
    `lost` the facilitator settles and the answer times out; `held` the request times out and
    the facilitator settles only when the test says (`release`); `dropped` it never settles;
    `refused` the facilitator refuses (nothing moves); `ok` as the real one."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.mode = inner, "ok"
        self.held: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def settle(self, payload: Any, requirements: Any) -> SettleResponse:
        if self.mode == "ok":
            return await self.inner.settle(payload, requirements)
        if self.mode == "refused":
            return SettleResponse(
                success=False,
                error_reason="invalid_exact_evm_insufficient_balance",
                transaction="",
                network=requirements.network,
            )
        if self.mode == "lost":
            await self.inner.settle(payload, requirements)
        elif self.mode == "held":
            self.held.append(
                {
                    "x402Version": 2,
                    "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
                    "paymentRequirements": requirements.model_dump(
                        by_alias=True, exclude_none=True
                    ),
                }
            )
        raise httpx.ReadTimeout("timed out")

    def release(self, facilitator_url: str) -> int:
        """The held settlements reach the facilitator now; how many there were."""
        held, self.held = self.held, []
        for body in held:
            answer = httpx.post(f"{facilitator_url}/settle", json=body, timeout=30)
            assert answer.json()["success"], answer.text
        return len(held)


def flaky_client(clients: list[FlakySettle]) -> Any:
    real = local.facilitator_client

    def make(url: str, timeout_s: float = 10.0) -> FlakySettle:
        clients.append(FlakySettle(real(url, timeout_s)))
        return clients[-1]

    return make


# --- the gateway ----------------------------------------------------------------------------


@pytest.fixture
def flaky_gw(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GatewayWorld, FlakySettle]]:
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g, clients[0]
    g.stop()


def paid_out(gw: GatewayWorld) -> list[dict[str, Any]]:
    return [t for t in gw.world.chain.transfers() if t["to"] == gw.cfg.pay_to]


def pending(gw: GatewayWorld) -> list[str]:
    with gw.store.session() as s:
        rows = s.query(GatewayPaymentRow).filter(GatewayPaymentRow.status == "pending").all()
        return [r.nonce for r in rows]


def completed(gw: GatewayWorld, job_id: str) -> bool:
    answer = httpx.get(f"{gw.url}/job-status", params={"jobId": job_id}, headers=gw.headers())
    return answer.json().get("status") == "completed"


def payment_for(gw: GatewayWorld, key: str, q: dict[str, Any], account: Any) -> str:
    """`account`'s signed payment for the 402 that a submission with `key` answers."""
    return signed_payment(gw, submit(gw, key, q).headers["PAYMENT-REQUIRED"], account, nonce())


def assert_income_once(gw: GatewayWorld, q: dict[str, Any]) -> None:
    """One transfer of the quote's amount, booked once as income."""
    [moved] = paid_out(gw)
    figures = book.figures(gw.store)
    assert figures["paymentsReceived"] == 1
    assert usd_to_micros(figures["incomeUsd"]) == moved["value"] == usd_to_micros(q["amount"])


def test_gateway_books_a_settlement_whose_answer_was_lost(
    flaky_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    gw, facilitator = flaky_gw
    facilitator.mode = "lost"
    q = quote(gw)
    payment = payment_for(gw, "lost-1", q, buyer(gw, "a"))
    paid = submit(gw, "lost-1", q, payment)
    # The money moved: the buyer gets the paid job (the ledger says so), not a 402.
    assert paid.status_code == 200, paid.text
    job_id = paid.json()["jobId"]
    again = submit(gw, "lost-1", q, payment)
    assert again.status_code == 200 and again.json()["jobId"] == job_id
    assert again.headers.get("X-Idempotent-Replay") == "true"
    assert_income_once(gw, q)
    wait_for(lambda: completed(gw, job_id))


def test_gateway_keeps_an_unknown_payment_until_it_settles_and_never_charges_twice(
    flaky_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    gw, facilitator = flaky_gw
    facilitator.mode = "held"
    q = quote(gw)
    payment = payment_for(gw, "late-1", q, buyer(gw, "b"))
    first = submit(gw, "late-1", q, payment)
    # Nobody knows yet whether the money moved: the buyer is told to come back, not to pay.
    assert first.status_code == 503, first.text
    assert int(first.headers["Retry-After"]) >= 1
    assert "same Idempotency-Key" in first.json()["error"]
    retry = submit(gw, "late-1", q, payment)
    assert retry.status_code == 409 and "Retry-After" in retry.headers, retry.text
    status = httpx.get(
        f"{gw.url}/job-status", params={"idempotencyKey": "late-1"}, headers=gw.headers()
    )
    assert status.status_code == 404
    assert len(pending(gw)) == 1 and paid_out(gw) == []
    # The facilitator settles after all: the money is booked once and the job runs.
    assert facilitator.release(gw.world.facilitator.url) == 1
    replay = wait_for(
        lambda: r if (r := submit(gw, "late-1", q, payment)).status_code == 200 else None
    )
    job_id = replay.json()["jobId"]
    assert replay.headers.get("X-Idempotent-Replay") == "true"
    assert pending(gw) == []
    assert_income_once(gw, q)
    wait_for(lambda: completed(gw, job_id))


def test_gateway_releases_an_unknown_payment_that_never_settles_after_its_window(
    flaky_gw: tuple[GatewayWorld, FlakySettle], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, facilitator = flaky_gw
    facilitator.mode = "dropped"
    q = quote(gw)
    account = buyer(gw, "c")
    payment = payment_for(gw, "gone-1", q, account)
    assert submit(gw, "gone-1", q, payment).status_code == 503
    assert len(pending(gw)) == 1
    # The loop asks the facilitator, finds it unused, and lets it go only past the window.
    monkeypatch.setattr(gateway_loop, "AUTH_WINDOW_S", 0.5)
    wait_for(lambda: pending(gw) == [])
    assert book.figures(gw.store)["jobs"] == {} and paid_out(gw) == []
    # The key is free again: a new payment buys the job, charged once.
    facilitator.mode = "ok"
    fresh = payment_for(gw, "gone-1", q, account)
    paid = submit(gw, "gone-1", q, fresh)
    assert paid.status_code == 200, paid.text
    assert [t["value"] for t in paid_out(gw)] == [usd_to_micros(q["amount"])]


def test_gateway_drops_a_payment_the_facilitator_refused(
    flaky_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    gw, facilitator = flaky_gw
    facilitator.mode = "refused"
    q = quote(gw)
    payment = payment_for(gw, "no-1", q, buyer(gw, "d"))
    refused = submit(gw, "no-1", q, payment)
    assert refused.status_code == 402, refused.text
    assert pending(gw) == [] and book.figures(gw.store)["jobs"] == {}
    assert submit(gw, "no-1", q).status_code == 402  # the key is free: asked to pay, not 409


def test_gateway_books_a_renewal_whose_answer_was_lost(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    long_job = (sys.executable, TRAIN, "--steps", "2000", "--step-time", "0.05")
    gw = start_gateway_world(tmp_path, sqlite_url, command=long_job)
    try:
        q1 = quote(gw)
        account = buyer(gw, "e")
        pay1 = payment_for(gw, "job-e", q1, account)
        job_id = submit(gw, "job-e", q1, pay1).json()["jobId"]
        clients[0].mode = "lost"
        q2 = quote(gw)
        body = {"jobId": job_id, "quoteId": q2["quoteId"]}
        headers = gw.headers("slice-e", q2["quoteId"])
        asked = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
        pay2 = signed_payment(gw, asked.headers["PAYMENT-REQUIRED"], account, nonce())
        headers["PAYMENT-SIGNATURE"] = pay2
        renewed = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["paidHours"] == pytest.approx(q1["hours"] + q2["hours"])
        replay = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
        assert replay.headers.get("X-Idempotent-Replay") == "true", replay.text
        amounts = sorted(t["value"] for t in paid_out(gw))
        assert amounts == sorted([usd_to_micros(q1["amount"]), usd_to_micros(q2["amount"])])
        figures = book.figures(gw.store)
        assert figures["paymentsReceived"] == 2
        assert usd_to_micros(figures["incomeUsd"]) == sum(amounts)
    finally:
        gw.stop()


# --- the mock vendor, under procure's agent --------------------------------------------------


@pytest.fixture
def flaky_world(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[World, list[FlakySettle]]]:
    clients: list[FlakySettle] = []
    monkeypatch.setattr(local, "facilitator_client", flaky_client(clients))
    w = start_world(tmp_path, sqlite_url)
    yield w, clients
    w.stop()


def agent_transfers(world: World, address: str) -> list[dict[str, Any]]:
    return [t for t in world.chain.transfers() if t["from"] == address]


def started(world: World) -> int:
    return sum(int(world.stats(v)["started"]) for v in world.vendors)


@pytest.mark.parametrize("mode", ["lost", "held"])
def test_mock_vendor_starts_every_job_it_was_paid_for(
    flaky_world: tuple[World, list[FlakySettle]], mode: str
) -> None:
    world, clients = flaky_world
    for client in clients:
        client.mode = mode
    stop = threading.Event()

    def settle_late() -> None:  # the facilitator settles a while after the vendor gave up
        while not stop.wait(0.3):
            for client in clients:
                client.release(world.facilitator.url)

    releaser = threading.Thread(target=settle_late, daemon=True)
    releaser.start()
    try:
        run_id = world.new_run()
        deps = world.deps()
        address = deps.account.address
        asyncio.run(drive(deps, run_id, limit_s=90))
    finally:
        stop.set()
        releaser.join(timeout=30)
    state = state_of(world, run_id)
    assert state.run.status == "completed", state.run.status_reason
    paid = agent_transfers(world, address)
    # Every transfer has its started job, and nothing was paid twice.
    assert len(paid) == started(world) == 1
    [payment] = [p for p in state.payments if p.status == "completed"]
    assert payment.amount == paid[0]["value"] and payment.x402_tx_id == paid[0]["tx_hash"]
    assert [j.status for j in state.jobs] == ["completed"]


def test_mock_vendor_applies_every_paid_slice(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_slices import sliced

    clients: list[FlakySettle] = []
    monkeypatch.setattr(local, "facilitator_client", flaky_client(clients))
    world = start_world(
        tmp_path,
        sqlite_url,
        job_seconds=2.0,
        settings_overrides={"PROCURE_FIRST_SLICE_FRACTION": 1.0},
    )
    try:
        for client in clients:
            client.mode = "lost"
        run_id = world.new_run(budget=5.0, gpu_type="H100")
        deps = world.deps()
        deps.planner = sliced("gpu_vendor_2")
        address = deps.account.address
        asyncio.run(drive(deps, run_id))
        state = state_of(world, run_id)
        assert state.run.status == "completed", state.run.status_reason
        paid = agent_transfers(world, address)
        assert len(paid) == started(world) == 4  # the job and its three renewals, once each
        completed = [p for p in state.payments if p.status == "completed"]
        assert sorted(p.x402_tx_id or "" for p in completed) == sorted(t["tx_hash"] for t in paid)
    finally:
        world.stop()


def test_gateway_refuses_an_authorisation_that_outlives_its_window(
    flaky_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    """A payment is dropped unsettled 330 s after it was written: one signed valid for an hour
    could settle after that with nobody left to book it, so it is refused before any money
    moves, and the key stays free for a payment of the usual 300 s."""
    gw, facilitator = flaky_gw
    facilitator.mode = "ok"
    q = quote(gw)
    account = buyer(gw, "f")
    required = submit(gw, "long-1", q).headers["PAYMENT-REQUIRED"]
    hour_long = signed_payment(gw, required, account, nonce(), int(time.time()) + 3600)
    refused = submit(gw, "long-1", q, hour_long)
    assert refused.status_code == 400 and "maxTimeoutSeconds" in refused.text, refused.text
    assert paid_out(gw) == [] and pending(gw) == []
    paid = submit(gw, "long-1", q, payment_for(gw, "long-1", q, account))
    assert paid.status_code == 200, paid.text
    assert_income_once(gw, q)


SELLER = "0x" + "5e" * 20


class _DownLedger:
    """A facilitator's ledger that cannot be reached, until it answers `used`."""

    def __init__(self) -> None:
        self.used: bool | None = None
        self.pay_to = SELLER

    async def lookup(self, payer: str, nonce: str) -> Settlement:
        if self.used is None:
            raise SettlementLookupError("facilitator unreachable")
        tx = "0xtx" if self.used else None
        return Settlement(used=self.used, transaction=tx, amount=1, pay_to=self.pay_to)


def test_a_doubt_the_ledger_cannot_answer_is_kept_past_its_authorisation() -> None:
    """The mock vendor's doubt: past the authorisation's end but with the ledger unreachable,
    the money may have moved: the job is kept (its key answers 409), and it starts once the
    ledger says the payment was used; only a ledger that says unused lets it go."""

    async def scenario() -> None:
        ledger = _DownLedger()
        started: list[str] = []
        forgotten: list[str] = []
        locks: dict[str, asyncio.Lock] = {}
        doubts = Doubts(
            ledger,  # type: ignore[arg-type]
            lambda d: locks.setdefault(d.name, asyncio.Lock()),
            lambda d: started.append(d.key),
            lambda d: forgotten.append(d.key),
        )
        for key in ("a", "b", "c"):
            doubts.open[f"submit:{key}"] = Doubt(
                "submit", key, ZERO, "0x01", time.time() - 1, SELLER, 1
            )
        held = await doubts.resolve("submit", "a")
        assert held is not None and held.status_code == 409
        assert started == forgotten == []
        ledger.used = True
        assert await doubts.resolve("submit", "a") is None
        assert started == ["a"] and forgotten == []
        ledger.used = False
        assert await doubts.resolve("submit", "b") is None
        assert forgotten == ["b"] and started == ["a"]
        # The nonce moved money, but to someone else (the buyer chose it): never started.
        ledger.used, ledger.pay_to = True, ZERO
        assert await doubts.resolve("submit", "c") is None
        assert forgotten == ["b", "c"] and started == ["a"]

    asyncio.run(scenario())
