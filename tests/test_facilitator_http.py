"""The local facilitator over its HTTP API: verify and settle real payments, refuse replays
and tampering, and always answer 200 as the x402 SDK expects."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

from procure.local import LocalServer, start_facilitator
from procure.payments.payer import PaymentLimits, build_payer, payment_nonce
from procure.vendors.registry import vendor_payee

PAYEE = vendor_payee("gpu_vendor_1")


@pytest.fixture
def facilitator(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_facilitator(tmp_path / "journal.jsonl")
    yield server
    server.stop()


def signed_payment(server: LocalServer, payment_id: str, amount: int = 1_400_000) -> dict[str, Any]:
    chain = server.app.state.chain
    account = Account.from_key("0x" + "42" * 32)
    chain.mint(account.address, 10_000_000)
    requirements = PaymentRequirements(
        scheme="exact",
        network=chain.network,
        asset=chain.token_address,
        amount=str(amount),
        pay_to=PAYEE,
        max_timeout_seconds=300,
        extra=chain.payment_extra(),
    )
    limits = PaymentLimits(amount, PAYEE, chain.token_address, chain.network)
    payer = build_payer(account, payment_nonce(payment_id), limits)
    required = PaymentRequired(
        x402_version=2,
        resource=ResourceInfo(url="http://vendor/submit-job"),
        accepts=[requirements],
    )
    payload = asyncio.run(payer.create_payment_payload(required))
    return {
        "x402Version": 2,
        "paymentPayload": payload.model_dump(by_alias=True, exclude_none=True),
        "paymentRequirements": requirements.model_dump(by_alias=True, exclude_none=True),
    }


def test_settles_once_and_refuses_replay(facilitator: LocalServer) -> None:
    body = signed_payment(facilitator, "pay-1")
    with httpx.Client(base_url=facilitator.url) as http:
        supported = http.get("/supported").json()
        assert supported["kinds"][0]["network"] == facilitator.app.state.chain.network
        assert http.post("/verify", json=body).json()["isValid"] is True
        first = http.post("/settle", json=body).json()
        assert first["success"] is True and first["transaction"].startswith("0x")
        replay = http.post("/settle", json=body)
        assert replay.status_code == 200
        assert replay.json()["success"] is False
        assert "nonce" in replay.json()["errorReason"]
        payer = first["payer"]
        nonce = payment_nonce("pay-1")
        lookup = http.get(f"/authorizations/{payer}/{nonce}").json()
        assert lookup == {
            "used": True,
            "transaction": first["transaction"],
            "payTo": PAYEE,
            "amount": "1400000",
        }
    assert facilitator.app.state.chain.balance_of(PAYEE) == 1_400_000


def test_same_payment_id_signs_the_same_nonce_so_a_retry_cannot_pay_twice(
    facilitator: LocalServer,
) -> None:
    first = signed_payment(facilitator, "pay-retry")
    retry = signed_payment(facilitator, "pay-retry")  # e.g. re-signed after a crash
    with httpx.Client(base_url=facilitator.url) as http:
        assert http.post("/settle", json=first).json()["success"] is True
        assert http.post("/settle", json=retry).json()["success"] is False
    assert facilitator.app.state.chain.balance_of(PAYEE) == 1_400_000


def test_refuses_tampered_amount(facilitator: LocalServer) -> None:
    body = signed_payment(facilitator, "pay-2", amount=1_400_000)
    body["paymentPayload"]["payload"]["authorization"]["value"] = "9400000"
    body["paymentRequirements"]["amount"] = "9400000"
    with httpx.Client(base_url=facilitator.url) as http:
        verdict = http.post("/verify", json=body).json()
        assert verdict["isValid"] is False
        assert "signature" in verdict["invalidReason"]
        settled = http.post("/settle", json=body).json()
        assert settled["success"] is False
    assert facilitator.app.state.chain.balance_of(PAYEE) == 0


def test_garbage_is_an_invalid_payment_not_a_500(facilitator: LocalServer) -> None:
    with httpx.Client(base_url=facilitator.url) as http:
        verify = http.post("/verify", json={"paymentPayload": {"nope": 1}})
        assert verify.status_code == 200 and verify.json()["isValid"] is False
        settle = http.post("/settle", json={})
        assert settle.status_code == 200 and settle.json()["success"] is False


def test_chain_state_survives_restart(tmp_path: Path) -> None:
    server = start_facilitator(tmp_path / "journal.jsonl")
    try:
        body = signed_payment(server, "pay-3")
        tx = httpx.post(f"{server.url}/settle", json=body).json()["transaction"]
    finally:
        server.stop()
    again = start_facilitator(tmp_path / "journal.jsonl")
    try:
        balance = httpx.get(f"{again.url}/balance/{PAYEE}").json()
        assert balance["atomic"] == "1400000"
        replay = httpx.post(f"{again.url}/settle", json=body).json()
        assert replay["success"] is False
        payer = Account.from_key("0x" + "42" * 32).address
        lookup = httpx.get(f"{again.url}/authorizations/{payer}/{payment_nonce('pay-3')}").json()
        assert lookup == {"used": True, "transaction": tx, "payTo": PAYEE, "amount": "1400000"}
    finally:
        again.stop()
