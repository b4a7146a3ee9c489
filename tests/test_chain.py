"""Real x402 settlement on the local in-process chain: SDK client and facilitator, no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from x402 import x402ClientSync
from x402.mechanisms.evm.constants import (
    AUTHORIZATION_STATE_ABI,
    BALANCE_OF_ABI,
    NAME_ABI,
    TRANSFER_WITH_AUTHORIZATION_BYTES_ABI,
    TRANSFER_WITH_AUTHORIZATION_VRS_ABI,
)
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.multicall import MulticallCall, encode_contract_call, multicall
from x402.mechanisms.evm.signer import FacilitatorEvmSigner
from x402.mechanisms.evm.types import AUTHORIZATION_TYPES, TypedDataDomain, TypedDataField
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements

from procure.payments import chain_journal
from procure.payments.chain import (
    ChainFacilitatorSigner,
    LocalChain,
    make_facilitator,
    make_facilitator_sync,
)

PRICE = 1_400_000  # 1.40 pUSD


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "chain.jsonl"


@pytest.fixture
def chain(journal: Path) -> LocalChain:
    return LocalChain(journal)


def _requirements(chain: LocalChain, pay_to: str, amount: int = PRICE) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact",
        network=chain.network,
        asset=chain.token_address,
        amount=str(amount),
        pay_to=pay_to,
        max_timeout_seconds=300,
        extra={"name": chain.token_name, "version": chain.token_version},
    )


def _pay(
    chain: LocalChain, payer: LocalAccount, requirements: PaymentRequirements
) -> PaymentPayload:
    client = x402ClientSync()
    register_exact_evm_client(client, payer, networks=chain.network)
    client.set_spend_controls(
        {
            "allowed_assets": [
                {
                    "network": chain.network,
                    "asset": chain.token_address,
                    "max_amount_per_payment": "5000000",
                }
            ]
        }
    )
    payload = client.create_payment_payload(PaymentRequired(accepts=[requirements]))
    assert isinstance(payload, PaymentPayload)
    return payload


def _tampered(payload: PaymentPayload, value: str) -> PaymentPayload:
    data = payload.model_copy(deep=True)
    data.payload["authorization"]["value"] = value
    return data


def _funded_payer(chain: LocalChain, amount: int = 5_000_000) -> LocalAccount:
    payer = Account.create()
    chain.mint(payer.address, amount)
    return payer


def test_constants_and_determinism(chain: LocalChain) -> None:
    assert chain.chain_id == 131277322940537
    assert chain.network == "eip155:131277322940537"
    assert (chain.token_name, chain.token_version, chain.token_decimals) == ("Procure USD", "2", 6)
    assert chain.payment_extra() == {"name": "Procure USD", "version": "2"}
    other = LocalChain(None)
    assert other.token_address == chain.token_address
    assert other.facilitator_address == chain.facilitator_address == chain.deployer_address
    signer = ChainFacilitatorSigner(chain)
    assert isinstance(signer, ChainFacilitatorSigner)
    protocol_methods = [
        name
        for name in vars(FacilitatorEvmSigner)
        if not name.startswith("_") and callable(getattr(FacilitatorEvmSigner, name))
    ]
    assert len(protocol_methods) == 9
    assert all(callable(getattr(signer, name)) for name in protocol_methods)
    assert signer.get_chain_id() == chain.chain_id
    assert signer.get_addresses() == [chain.facilitator_address]
    assert signer.get_code(chain.token_address)
    assert signer.get_code(Account.create().address) == b""
    assert signer.get_balance(chain.facilitator_address, "") > 0


def test_verify_and_settle_moves_balances(chain: LocalChain) -> None:
    payer = _funded_payer(chain)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payload = _pay(chain, payer, requirements)
    facilitator = make_facilitator(chain)
    assert chain.network in {k.network for k in facilitator.get_supported().kinds}

    verified = asyncio.run(facilitator.verify(payload, requirements))
    assert verified.is_valid, verified
    assert verified.payer == payer.address

    settled = asyncio.run(facilitator.settle(payload, requirements))
    assert settled.success, settled
    assert settled.network == chain.network
    assert settled.transaction.startswith("0x") and len(settled.transaction) == 66
    assert chain.receipt(settled.transaction)["status"] == 1

    assert chain.balance_of(payer.address) == 5_000_000 - PRICE
    assert chain.balance_of(vendor) == PRICE
    nonce = payload.payload["authorization"]["nonce"]
    assert chain.authorization_state(payer.address, nonce)
    last = chain.transfers()[-1]
    assert last == {
        "from": payer.address,
        "to": vendor,
        "value": PRICE,
        "tx_hash": settled.transaction,
        "block_number": last["block_number"],
        "log_index": last["log_index"],
    }


def test_replayed_payload_fails_with_nonce_used(chain: LocalChain) -> None:
    payer = _funded_payer(chain)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payload = _pay(chain, payer, requirements)
    facilitator = make_facilitator_sync(chain)
    assert facilitator.settle(payload, requirements).success

    again = facilitator.settle(payload, requirements)
    assert not again.success
    assert again.error_reason == "invalid_exact_evm_nonce_already_used"
    assert again.transaction == ""
    reverify = facilitator.verify(payload, requirements)
    assert not reverify.is_valid
    assert reverify.invalid_reason == "invalid_exact_evm_nonce_already_used"
    assert chain.balance_of(vendor) == PRICE
    assert len([t for t in chain.transfers() if t["to"] == vendor]) == 1


def test_tampered_amount_fails_verify(chain: LocalChain) -> None:
    payer = _funded_payer(chain)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payload = _pay(chain, payer, requirements)
    facilitator = make_facilitator_sync(chain)

    # Amount changed in the payload only: the SDK's amount check catches it.
    result = facilitator.verify(_tampered(payload, "1"), requirements)
    assert not result.is_valid
    assert result.invalid_reason == "invalid_exact_evm_payload_authorization_value_mismatch"

    # Amount changed in both: only the signature can tell, and it does.
    cheap = _requirements(chain, vendor, amount=1)
    cheap_payload = _tampered(payload, "1")
    cheap_payload.accepted.amount = "1"
    result = facilitator.verify(cheap_payload, cheap)
    assert not result.is_valid
    assert result.invalid_reason == "invalid_exact_evm_payload_signature"
    settled = facilitator.settle(cheap_payload, cheap)
    assert not settled.success
    assert settled.error_reason == "invalid_exact_evm_payload_signature"
    assert chain.balance_of(vendor) == 0


@pytest.mark.parametrize("funds", [0, PRICE - 1])
def test_unfunded_payer_reports_insufficient_balance(chain: LocalChain, funds: int) -> None:
    payer = Account.create()
    if funds:
        chain.mint(payer.address, funds)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payload = _pay(chain, payer, requirements)
    facilitator = make_facilitator(chain)

    verified = asyncio.run(facilitator.verify(payload, requirements))
    assert not verified.is_valid
    assert verified.invalid_reason == "invalid_exact_evm_insufficient_balance"
    assert "transfer amount exceeds balance" in (verified.invalid_message or "")

    settled = asyncio.run(facilitator.settle(payload, requirements))
    assert not settled.success
    assert settled.error_reason == "invalid_exact_evm_insufficient_balance"
    assert chain.balance_of(payer.address) == funds
    assert not chain.authorization_state(payer.address, payload.payload["authorization"]["nonce"])


def test_restart_replays_journal(journal: Path) -> None:
    chain = LocalChain(journal)
    payer = _funded_payer(chain)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payload = _pay(chain, payer, requirements)
    assert make_facilitator_sync(chain).settle(payload, requirements).success
    unfunded = _pay(chain, Account.create(), requirements)
    assert not make_facilitator_sync(chain).settle(unfunded, requirements).success
    before = chain.transfers()
    nonce = payload.payload["authorization"]["nonce"]

    restarted = LocalChain(journal)
    assert restarted.token_address == chain.token_address
    assert restarted.transfers() == before
    assert restarted.balance_of(payer.address) == chain.balance_of(payer.address)
    assert restarted.balance_of(vendor) == PRICE
    assert restarted.authorization_state(payer.address, nonce)

    facilitator = make_facilitator_sync(restarted)
    again = facilitator.settle(payload, requirements)
    assert again.error_reason == "invalid_exact_evm_nonce_already_used"
    second = _pay(restarted, payer, requirements)
    assert facilitator.settle(second, requirements).success

    third_life = LocalChain(journal)
    assert third_life.balance_of(vendor) == 2 * PRICE
    assert third_life.transfers() == restarted.transfers()
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert lines[0]["op"] == "genesis"
    assert [line["function"] for line in lines[1:]] == [
        "mint",
        "transferWithAuthorization",
        "transferWithAuthorization",
    ]
    assert lines[2]["args"]["nonce"] == nonce


def test_torn_journal_tail_is_dropped(journal: Path) -> None:
    chain = LocalChain(journal)
    payer = _funded_payer(chain, 7)
    with journal.open("ab") as fh:
        fh.write(b'{"op":"tx","raw_tx":"0x02f8')  # crash mid-write: never acknowledged
    restarted = LocalChain(journal)
    assert restarted.balance_of(payer.address) == 7
    restarted.mint(payer.address, 1)
    assert LocalChain(journal).balance_of(payer.address) == 8


def test_failed_journal_write_rolls_back(journal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = LocalChain(journal)
    payer = _funded_payer(chain)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payload = _pay(chain, payer, requirements)
    size = journal.stat().st_size

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(chain_journal.os, "fsync", disk_full)
        settled = make_facilitator_sync(chain).settle(payload, requirements)

    assert not settled.success
    assert settled.error_reason == "transaction_failed"
    assert "No space left on device" in (settled.error_message or "")
    assert journal.stat().st_size == size
    assert chain.balance_of(vendor) == 0
    assert not chain.authorization_state(payer.address, payload.payload["authorization"]["nonce"])
    retry = make_facilitator_sync(chain).settle(payload, requirements)
    assert retry.success, retry
    assert LocalChain(journal).balance_of(vendor) == PRICE


def test_concurrent_settlements(journal: Path) -> None:
    chain = LocalChain(journal)
    facilitator = make_facilitator_sync(chain)
    vendor = Account.create().address
    requirements = _requirements(chain, vendor)
    payloads = [_pay(chain, _funded_payer(chain), requirements) for _ in range(6)]
    results: list[Any] = []

    def settle(payload: PaymentPayload) -> None:
        results.append(facilitator.settle(payload, requirements))

    threads = [threading.Thread(target=settle, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.success for r in results), results
    assert chain.balance_of(vendor) == 6 * PRICE
    assert LocalChain(journal).transfers() == chain.transfers()


def test_contract_enforces_eip3009_rules(chain: LocalChain) -> None:
    signer = ChainFacilitatorSigner(chain)
    payer = _funded_payer(chain)
    vendor = Account.create().address
    now = int(time.time())

    def authorization(valid_after: int, valid_before: int) -> tuple[list[Any], bytes]:
        nonce = os.urandom(32)
        message = {
            "from": payer.address,
            "to": vendor,
            "value": PRICE,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        }
        signed = payer.sign_typed_data(
            domain_data={
                "name": chain.token_name,
                "version": chain.token_version,
                "chainId": chain.chain_id,
                "verifyingContract": chain.token_address,
            },
            message_types=AUTHORIZATION_TYPES,
            message_data=message,
        )
        args = [payer.address, vendor, PRICE, valid_after, valid_before, nonce]
        return args, bytes(signed.signature)

    def vrs(args: list[Any], sig: bytes) -> list[Any]:
        return [*args, sig[64], sig[:32], sig[32:64]]

    def reverts(args: list[Any], reason: str) -> None:
        with pytest.raises(TransactionFailed, match=reason):
            signer.write_contract(
                chain.token_address,
                TRANSFER_WITH_AUTHORIZATION_VRS_ABI,
                "transferWithAuthorization",
                *args,
            )

    args, sig = authorization(0, now - 1)
    reverts(vrs(args, sig), "authorization is expired")
    args, sig = authorization(now + 3600, now + 7200)
    reverts(vrs(args, sig), "authorization is not yet valid")
    args, sig = authorization(0, now + 3600)
    reverts(vrs([*args[:2], PRICE + 1, *args[3:]], sig), "invalid signature")

    # EIP-712 check through the protocol method, then the bytes overload settles it.
    domain = TypedDataDomain(
        chain.token_name, chain.token_version, chain.chain_id, chain.token_address
    )
    types = {
        name: [TypedDataField(f["name"], f["type"]) for f in fields]
        for name, fields in AUTHORIZATION_TYPES.items()
    }
    message = dict(
        zip(["from", "to", "value", "validAfter", "validBefore", "nonce"], args, strict=True)
    )
    assert signer.verify_typed_data(
        payer.address, domain, types, "TransferWithAuthorization", message, sig
    )
    assert not signer.verify_typed_data(
        vendor, domain, types, "TransferWithAuthorization", message, sig
    )
    tx_hash = signer.write_contract(
        chain.token_address,
        TRANSFER_WITH_AUTHORIZATION_BYTES_ABI,
        "transferWithAuthorization",
        *args,
        sig,
    )
    assert signer.wait_for_transaction_receipt(tx_hash).status == 1
    assert chain.balance_of(vendor) == PRICE
    reverts(vrs(args, sig), "authorization is used")


def test_multicall3_reads_are_emulated(chain: LocalChain) -> None:
    """The SDK's diagnostics batch reads through Multicall3, which the local chain lacks."""
    signer = ChainFacilitatorSigner(chain)
    payer = _funded_payer(chain, 42)
    token = chain.token_address
    failing = encode_contract_call(
        TRANSFER_WITH_AUTHORIZATION_BYTES_ABI,
        "transferWithAuthorization",
        payer.address,
        payer.address,
        1,
        0,
        2**40,
        b"\x01" * 32,
        b"\x00" * 65,
    )
    results = multicall(
        signer,
        [
            MulticallCall(token, BALANCE_OF_ABI, "balanceOf", (payer.address,)),
            MulticallCall(token, NAME_ABI, "name"),
            MulticallCall(
                token, AUTHORIZATION_STATE_ABI, "authorizationState", (payer.address, b"\x01" * 32)
            ),
            MulticallCall(token, call_data=failing),
        ],
    )
    assert [r.success for r in results] == [True, True, True, False]
    assert [r.result for r in results[:3]] == [42, "Procure USD", False]
    assert "invalid signature" in str(results[3].error)


def test_only_deployer_may_mint(chain: LocalChain) -> None:
    outsider = Account.from_key(b"\x00" * 31 + b"\x01").address  # funded in genesis for gas
    token = chain.contract(chain.token_address, chain.token_abi)
    with pytest.raises(TransactionFailed, match="caller is not the owner"):
        token.functions.mint(outsider, 1).call({"from": outsider})
    assert chain.read(token.functions.owner()) == chain.deployer_address
