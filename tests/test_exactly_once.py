"""Money that cannot be lost, one hole at a time: an unfunded wallet, a paid request whose answer
is lost, two submissions racing with one key, a signed payment the vendor turned down, and the
budget checked against the store itself when a job is about to be paid.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.agent.runtime import close_deps
from procure.agent.tick import AgentDeps, tick
from procure.models import usd_to_micros
from procure.payments.payer import PaymentLimits, build_payer, payment_nonce
from procure.payments.settlements import SettlementLookupError
from procure.store import repo
from procure.vendors.client import VendorError
from world import SECRET, World, drive, start_world, state_of

ZERO = "0x" + "0" * 40


def paid_transfers(world: World) -> list[dict[str, Any]]:
    return [t for t in world.chain.transfers() if t["from"] != ZERO]


@pytest.fixture
def unfunded(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = start_world(tmp_path, db_url, fund_usd=0)
    yield w
    w.stop()


def test_unfunded_wallet_fails_the_run_clearly_without_paying(unfunded: World) -> None:
    world = unfunded
    run_id = world.new_run()
    deps = world.deps()

    async def scenario() -> list[str]:
        try:
            first = (await tick(deps, run_id)).message
            again = (await tick(deps, run_id)).message  # the run does not go round again
            return [first, again]
        finally:
            await close_deps(deps)

    assert asyncio.run(scenario()) == ["Insufficient balance", "Run already failed"]
    state = state_of(world, run_id)
    assert state.run.status == "failed"
    reason = state.run.status_reason or ""
    assert reason.startswith("Insufficient balance: wallet ") and "holds $0.00" in reason
    assert "procure wallet --fund" in reason
    [payment] = state.payments
    assert payment.status == "failed" and "insufficient balance" in (payment.error_message or "")
    [job] = state.jobs
    assert job.status == "failed"
    errors = [o for o in state.observations if o.type == "error"]
    assert [o.vendor_id for o in errors] == [None]  # not held against the vendor
    assert "insufficient balance" in errors[0].content
    assert paid_transfers(world) == []
    assert state.run.budget_remaining == state.run.budget_total
    assert world.stats("gpu_vendor_1")["submissions"] == 0  # nothing was even sent


def test_signed_payment_turned_down_stays_pending_until_it_expires(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The balance check cannot be made, so the agent signs; the facilitator finds no funds and
    # the vendor answers 402. The vendor holds a valid authorisation: the payment is in doubt,
    # pending (counted against the budget) until it expires unused, and only then failed.
    world = start_world(
        tmp_path, sqlite_url, fund_usd=0, settings_overrides={"VENDOR_COOLDOWN_S": 30}
    )
    try:
        run_id = world.new_run()
        deps = world.deps()
        deps.auth_window_s, deps.auth_margin_s = 8, 0.5

        async def no_balance(_address: str) -> int:
            raise SettlementLookupError("balance unavailable (test)")

        deps.ledger.balance = no_balance  # type: ignore[method-assign]

        async def scenario() -> list[str]:
            messages = [(await tick(deps, run_id)).message]
            state = state_of(world, run_id)
            [payment] = state.payments
            assert (payment.status, state.jobs[0].status) == ("pending", "submitted")
            assert "insufficient_balance" in (payment.error_message or "")
            assert state.run.budget_remaining == state.run.budget_total
            messages.append((await tick(deps, run_id)).message)  # waits; does not pay again
            world.chain.mint(deps.account.address, usd_to_micros(10))
            expiry = payment.created_at.timestamp() + 8 + 0.5
            await asyncio.sleep(max(0.0, expiry - time.time()) + 1.1)
            messages += await drive(deps, run_id)
            await close_deps(deps)
            return messages

        messages = asyncio.run(scenario())
        assert messages[0] == "Payment in doubt"
        assert messages[1].startswith("Payment in doubt until ")
        assert messages[2] == "Job failed" and messages[-1] == "Job completed"
        state = state_of(world, run_id)
        assert state.run.status == "completed"
        first, second = state.payments
        assert (first.vendor_id, first.status) == ("gpu_vendor_1", "failed")
        assert "expired unused" in (first.error_message or "")
        assert (second.vendor_id, second.status) == ("gpu_vendor_2", "completed")
        assert any(
            "stays valid until" in o.content for o in state.observations if o.type == "error"
        )
        # The authorisation the vendor saw is dead: signed again (identically), it is refused.
        vendor1 = world.vendors["gpu_vendor_1"]
        payer = build_payer(
            deps.account,
            payment_nonce(first.id),
            PaymentLimits(1_400_000, vendor1.pay_to, vendor1.asset, vendor1.network),
            valid_before=int(first.created_at.timestamp()) + 8,
        )
        with pytest.raises(VendorError, match="payment not accepted"):
            asyncio.run(_submit_again(world, payer, "job-" + first.job_id))
        assert [t["to"] for t in paid_transfers(world)] == [world.vendors["gpu_vendor_2"].pay_to]
    finally:
        world.stop()


async def _submit_again(world: World, payer: Any, key: str) -> None:
    from procure.vendors.client import VendorClient
    from procure.vendors.credentials import Keyring

    client = VendorClient(Keyring.load(world.settings.home))
    vendor = world.vendors["gpu_vendor_1"]
    try:
        quote = await client.quote(vendor, state_spec())
        await client.submit(vendor, quote.quote_id, idempotency_key=key, job_params={}, payer=payer)
    finally:
        await client.aclose()


def state_spec() -> Any:
    from procure.models import JobSpec

    return JobSpec()


def test_paid_request_that_times_out_is_reconciled_not_failed(
    tmp_path: Path, sqlite_url: str
) -> None:
    # The vendor settles after our client gave up. Before the fix this was a "refused" payment,
    # marked failed while the money moved. (It also asks half its quote: the store learns
    # from the ledger what really moved.)
    world = start_world(tmp_path, sqlite_url, settings_overrides={"VENDOR_TIMEOUT_S": 1.0})
    try:
        world.faults(
            "gpu_vendor_1", hang_seconds=1.6, overcharge_factor=0.5, endpoints=["submit-job"]
        )
        run_id = world.new_run()
        deps = world.deps()

        async def scenario() -> list[str]:
            first = (await tick(deps, run_id)).message
            state = state_of(world, run_id)
            assert [p.status for p in state.payments] == ["pending"]
            world.faults("gpu_vendor_1")
            await asyncio.sleep(1.0)  # the vendor finishes the hung request, and settles it
            try:
                return [first, *await drive(deps, run_id)]
            finally:
                await close_deps(deps)

        messages = asyncio.run(scenario())
        assert messages[0] == "Vendor error"
        assert messages[1] == "Job started (reconciled)"
        state = state_of(world, run_id)
        assert state.run.status == "completed"
        [payment] = state.payments
        assert payment.status == "completed"
        [transfer] = paid_transfers(world)
        assert payment.x402_tx_id == transfer["tx_hash"]
        assert payment.amount == transfer["value"] == 700_000
        assert state.run.budget_remaining == 5_000_000 - 700_000
        assert world.stats("gpu_vendor_1")["started"] == 1
    finally:
        world.stop()


def test_racing_submissions_with_one_key_start_and_pay_once(healthy: World) -> None:
    world = healthy
    vendor = world.vendors["gpu_vendor_1"]
    from procure.vendors.client import VendorClient
    from procure.vendors.credentials import Keyring

    deps = world.deps()
    nonce = payment_nonce("race-payment")
    limits = PaymentLimits(1_400_000, vendor.pay_to, vendor.asset, vendor.network)
    valid_before = int(time.time()) + 120

    async def race() -> list[Any]:
        client = VendorClient(Keyring.load(world.settings.home))
        try:
            quote = await client.quote(vendor, state_spec())
            return await asyncio.gather(
                *(
                    client.submit(
                        vendor,
                        quote.quote_id,
                        idempotency_key="job-race",
                        job_params={},
                        payer=build_payer(deps.account, nonce, limits, valid_before=valid_before),
                    )
                    for _ in range(4)
                ),
                return_exceptions=True,
            )
        finally:
            await close_deps(deps)
            await client.aclose()

    results = asyncio.run(race())
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len({r.job.job_id for r in results}) == 1
    assert sorted(r.replayed for r in results) == [False, True, True, True]
    assert len(paid_transfers(world)) == 1
    stats = world.stats("gpu_vendor_1")["keys"]["job-race"]
    assert (stats["started"], stats["replays"]) == (1, 3)
    assert stats["submissions"] >= 4  # requests: an unpaid first try each, and paid retries


@pytest.fixture
def healthy(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url)
    yield w
    w.stop()


def test_job_is_not_started_over_a_budget_committed_meanwhile(healthy: World) -> None:
    # Another ticker (a worker whose lease was lost) committed a payment after this tick read
    # the run: the intent is checked against the store, not against what the tick read.
    world = healthy
    run_id = world.new_run(budget=3.0)
    deps = world.deps()
    from procure.agent import tick as tick_module

    real_load = tick_module.repo.load_tick_state  # the tick's first read, before planning

    def load_then_someone_pays(s: Any, rid: str) -> Any:
        state = real_load(s, rid)
        with world.store.session() as other:
            run = repo.get_run(other, rid)
            assert run is not None
            _insert_paid_job(other, rid, amount=2_000_000)
        return state

    tick_module.repo.load_tick_state = load_then_someone_pays  # type: ignore[assignment]
    try:
        message = asyncio.run(_tick_and_close(deps, run_id))
    finally:
        tick_module.repo.load_tick_state = real_load  # type: ignore[assignment]
    assert message == "State changed"
    state = state_of(world, run_id)
    assert len(state.payments) == 1  # only the other ticker's
    assert any("Not starting a job" in o.content for o in state.observations)
    assert paid_transfers(world) == []


async def _tick_and_close(deps: AgentDeps, run_id: str) -> str:
    try:
        return (await tick(deps, run_id)).message
    finally:
        await close_deps(deps)


def _insert_paid_job(s: Any, run_id: str, amount: int) -> None:
    from procure.models import Job, JobStatus, Payment, PaymentStatus, utcnow

    now = utcnow()
    job_id, payment_id = repo.new_id(), repo.new_id()
    repo.insert_job(
        s,
        Job(
            _id=job_id,
            run_id=run_id,
            vendor_id="gpu_vendor_2",
            status=JobStatus.failed,
            expected_cost=amount,
            idempotency_key=f"job-{job_id}",
            created_at=now,
            updated_at=now,
        ),
    )
    s.flush()
    repo.insert_payment(
        s,
        Payment(
            _id=payment_id,
            run_id=run_id,
            job_id=job_id,
            vendor_id="gpu_vendor_2",
            amount=amount,
            status=PaymentStatus.completed,
            nonce=payment_nonce(payment_id),
            created_at=now,
            updated_at=now,
        ),
    )


def test_admin_stats_needs_the_vendor_secret(healthy: World) -> None:
    url = f"{healthy.vendor_servers['gpu_vendor_1'].url}/admin/stats"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {SECRET}"}).json()["started"] == 0


def test_settlement_lookup_by_nonce_survives_a_facilitator_restart(healthy: World) -> None:
    from procure.payments.chain import LocalChain

    world = healthy
    run_id = world.new_run()
    assert asyncio.run(_tick_and_close(world.deps(), run_id)) == "Job started"
    [payment] = state_of(world, run_id).payments
    wallet = world.deps().account.address
    assert payment.x402_tx_id is not None
    assert world.chain.transaction_for_nonce(wallet, payment.nonce) == payment.x402_tx_id
    replayed = LocalChain(world.chain.journal_path)  # what a restarted facilitator rebuilds
    assert replayed.transaction_for_nonce(wallet.lower(), payment.nonce) == payment.x402_tx_id
    assert replayed.transaction_for_nonce(wallet, payment_nonce("never-paid")) is None


def test_payment_in_doubt_when_its_run_ended_is_settled_by_the_worker(healthy: World) -> None:
    # A run finished elsewhere while one of its payments was in doubt (a signed authorisation
    # turned down, still valid). Nobody ticks an ended run: the worker's settler records the
    # payment's fate once the ledger knows it, here: settled after all, and expired unused.
    from procure.agent.reconcile import settle_ended_runs

    world = healthy
    run_id = world.new_run()
    deps = world.deps()
    deps.auth_window_s, deps.auth_margin_s = 300, 0

    async def scenario() -> tuple[int, int]:
        try:
            assert (await tick(deps, run_id)).message == "Job started"
            with world.store.session() as s:
                # As if its answer had been lost and the run had then ended: pending, in doubt.
                [paid] = state_of(world, run_id).payments
                repo.update_payment(s, paid.id, status="pending", error_message="refused: test")
                _insert_paid_job(s, run_id, amount=100_000)  # never settled on the chain
            with world.store.session() as s:
                others = [p for p in state_of(world, run_id).payments if p.id != paid.id]
                repo.update_payment(s, others[0].id, status="pending", error_message="refused")
                repo.update_run(s, run_id, status="completed")
            first = await settle_ended_runs(deps)  # the used one; the other is still valid
            deps.auth_window_s = -10  # now every authorisation has expired
            second = await settle_ended_runs(deps)
            return first, second
        finally:
            await close_deps(deps)

    assert asyncio.run(scenario()) == (1, 1)
    state = state_of(world, run_id)
    by_status = {p.status: p for p in state.payments}
    assert set(by_status) == {"completed", "failed"}
    assert by_status["completed"].x402_tx_id == paid_transfers(world)[0]["tx_hash"]
    assert "expired unused" in (by_status["failed"].error_message or "")
    assert state.run.budget_remaining == 5_000_000 - by_status["completed"].amount
    notes = [o.content for o in state.observations if o.type == "payment_event"]
    assert any("settled after all" in n for n in notes)
    assert any("expired unused: no money moved" in n for n in notes)


def test_vendor_asking_less_than_quoted_is_paid_and_recorded_at_what_moved(healthy: World) -> None:
    world = healthy
    world.faults("gpu_vendor_1", overcharge_factor=0.5)  # a discount, within the guardrails
    run_id = world.new_run()
    assert asyncio.run(_tick_and_close(world.deps(), run_id)) == "Job started"
    [payment] = state_of(world, run_id).payments
    [transfer] = paid_transfers(world)
    assert payment.amount == transfer["value"] == 700_000
    assert state_of(world, run_id).run.budget_remaining == 5_000_000 - 700_000
