"""Guardrails on every payment, through the real loopback world (SDK client, mock vendors, local
facilitator and chain): a 402 that asks more than the quote, or pays another payee, in another
asset or on another network, is refused before anything is signed. The payment fails, no money
moves, the reason is observed, the vendor is penalised, and the run completes elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procure.payments.payer import PaymentLimits, check_requirements
from procure.store import repo
from procure.vendors.mock import FOREIGN_ASSET, FOREIGN_NETWORK, FOREIGN_PAYEE
from world import World, drive, start_world, state_of

ZERO = "0x" + "0" * 40


def paid_transfers(world: World) -> list[dict[str, Any]]:
    """Every token transfer but mints."""
    return [t for t in world.chain.transfers() if t["from"] != ZERO]


@pytest.fixture
def healthy_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """Both vendors healthy: the agent picks vendor 1 first (cheaper per expected success)."""
    w = start_world(tmp_path, db_url)
    yield w
    w.stop()


FAULTS = {
    "overcharge": ({"overcharge_factor": 1.5}, "402 asks $2.10, more than the quoted $1.40"),
    "foreign-payee": ({"foreign_payee": True}, f"402 pays {FOREIGN_PAYEE}, not the vendor's"),
    "foreign-asset": ({"foreign_asset": True}, f"402 asks asset {FOREIGN_ASSET}, not the"),
    "foreign-network": ({"foreign_network": True}, f"402 asks network {FOREIGN_NETWORK}, not"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_refused_unpaid_and_run_completes_elsewhere(
    healthy_world: World, name: str
) -> None:
    world = healthy_world
    fault, reason = FAULTS[name]
    world.faults("gpu_vendor_1", **fault)
    wallet = world.deps().account.address
    before = world.chain.balance_of(wallet)
    run_id = world.new_run()

    messages = asyncio.run(drive(world.deps(), run_id))

    assert messages[0] == "Payment refused"
    assert messages[-1] == "Job completed"
    state = state_of(world, run_id)
    assert state.run.status == "completed"
    v1_payment, v2_payment = state.payments
    assert (v1_payment.vendor_id, v1_payment.status) == ("gpu_vendor_1", "failed")
    assert reason in (v1_payment.error_message or "")
    assert (v2_payment.vendor_id, v2_payment.status) == ("gpu_vendor_2", "completed")
    assert [(j.vendor_id, j.status) for j in state.jobs] == [
        ("gpu_vendor_1", "failed"),
        ("gpu_vendor_2", "completed"),
    ]
    errors = [o for o in state.observations if o.type == "error"]
    assert any(
        o.vendor_id == "gpu_vendor_1"
        and "Payment to gpu_vendor_1 refused" in o.content
        and reason in o.content
        for o in errors
    ), [o.content for o in errors]
    assert state.run.budget_remaining == 5_000_000 - 2_100_000

    # On the chain: one transfer, to vendor 2's registered payee; nothing to vendor 1 or a stranger.
    assert [(t["from"], t["to"], t["value"]) for t in paid_transfers(world)] == [
        (wallet, world.vendors["gpu_vendor_2"].pay_to, 2_100_000)
    ]
    assert v2_payment.x402_tx_id == paid_transfers(world)[0]["tx_hash"]
    assert world.chain.balance_of(FOREIGN_PAYEE) == 0
    assert world.chain.balance_of(wallet) == before - 2_100_000
    # The vendor never started a job for the refused key, and was penalised.
    assert world.stats("gpu_vendor_1")["started"] == 0
    with world.store.session() as s:
        vendor1 = repo.get_vendor(s, "gpu_vendor_1")
    assert vendor1 is not None and vendor1.failures == 1 and vendor1.cooldown_until is not None


def test_registry_without_payee_asset_or_network_pays_nobody() -> None:
    class Req:
        amount, pay_to, asset, network = "100", "0xabc", "0xdef", "eip155:1"

    ok = PaymentLimits(max_amount=100, pay_to="0xABC", asset="0xDEF", network="eip155:1")
    assert check_requirements(Req(), ok) is None
    for missing in ("pay_to", "asset", "network"):
        limits = PaymentLimits(**{**ok.__dict__, missing: None})
        reason = check_requirements(Req(), limits)
        assert reason is not None and "vendor registry has no" in reason
