"""The local chain's clock keeps up with the wall clock under a burst of transactions.

A short-lived payment authorization (``validBefore`` a few seconds ahead, as with a small
PROCURE_PAYMENT_WINDOW_S) must still settle right after a burst of settlements, and a chain
restarted from its journal must come back with the same balances, nonces and tx hashes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from eth_account import Account
from x402 import x402ClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements

from procure.payments.chain import LocalChain, make_facilitator_sync

BURST = 40  # transactions sent back to back, far more than one per second
PRICE = 10_000


def _requirements(chain: LocalChain, pay_to: str, window_s: int) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact",
        network=chain.network,
        asset=chain.token_address,
        amount=str(PRICE),
        pay_to=pay_to,
        max_timeout_seconds=window_s,
        extra=chain.payment_extra(),
    )


def _pay(chain: LocalChain, payer: object, requirements: PaymentRequirements) -> PaymentPayload:
    client = x402ClientSync()
    register_exact_evm_client(client, payer, networks=chain.network)
    client.set_spend_controls({"allowed_assets": True})
    payload = client.create_payment_payload(PaymentRequired(accepts=[requirements]))
    assert isinstance(payload, PaymentPayload)
    return payload


def test_short_window_payment_settles_after_a_burst_and_replays(tmp_path: Path) -> None:
    journal = tmp_path / "chain.jsonl"
    chain = LocalChain(journal)
    facilitator = make_facilitator_sync(chain)
    payer = Account.create()
    vendor = Account.create().address
    chain.mint(payer.address, (BURST + 1) * PRICE)

    settled = []
    for _ in range(BURST):  # a burst of settlements, as fast as the chain takes them
        requirements = _requirements(chain, vendor, window_s=300)
        result = facilitator.settle(_pay(chain, payer, requirements), requirements)
        assert result.success, result
        settled.append(result.transaction)
        assert chain.receipt(result.transaction)["status"] == 1  # mined at once

    # Block time stays with the wall clock instead of running ahead by one second per tx...
    assert chain.block_timestamp() <= time.time() + 2
    # ...so an authorization valid for only 15 s still settles on chain.
    short = _requirements(chain, vendor, window_s=15)
    result = facilitator.settle(_pay(chain, payer, short), short)
    assert result.success, result
    settled.append(result.transaction)

    # Many blocks now share a second, but block time never goes backwards, and the journal
    # (replayed below) records exactly that.
    stamps = [line["timestamp"] for line in map(json.loads, journal.read_text().splitlines())]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) < len(stamps)
    restarted = LocalChain(journal)
    for address in (payer.address, vendor, chain.facilitator_address):
        assert restarted.balance_of(address) == chain.balance_of(address)
    assert restarted.native_balance(chain.facilitator_address) == chain.native_balance(
        chain.facilitator_address
    )
    assert restarted.transfers() == chain.transfers()
    assert restarted.used_authorizations() == chain.used_authorizations()
    assert restarted.block_timestamp() == chain.block_timestamp()
    assert restarted.balance_of(vendor) == (BURST + 1) * PRICE
