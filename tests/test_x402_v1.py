"""x402 v1 and v2 vendors alike, over loopback against the local facilitator and chain: the payer
pays a v1-only vendor (402 with a JSON body, `X-PAYMENT`), a v2-only one and one speaking both,
under the same guardrails (amount, payee, asset, network: refused before anything is signed) and
exactly once (a replay is answered unpaid; the payment's nonce settles once). A vendor whose
requirements carry a lowercase payee or asset is paid and settled. The first paid answer says the
hours paid for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from procure.local import LocalServer, mock_vendor_config, start_facilitator, start_mock_vendor
from procure.models import JobSpec, Vendor, usd_to_micros
from procure.payments.chain import LocalChain
from procure.payments.payer import PaymentLimits, build_payer, check_requirements, payment_nonce
from procure.vendors.client import PaymentRefused, Submitted, VendorClient
from procure.vendors.credentials import Keyring
from procure.vendors.mock import FOREIGN_ASSET, FOREIGN_PAYEE
from procure.vendors.registry import vendor_payee

SECRET = "x402-test-secret"
ZERO = "0x" + "0" * 40


@dataclass
class Net:
    facilitator: LocalServer
    chain: LocalChain
    keyring: Keyring


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp = tmp_path_factory.mktemp("x402v1")
    facilitator = start_facilitator(tmp / "chain.jsonl")
    yield Net(facilitator, facilitator.app.state.chain, Keyring.load(tmp / "home"))
    facilitator.stop()


@dataclass
class Shop:
    vendor: Vendor
    server: LocalServer


@pytest.fixture
def shop(net: Net, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A factory of mock vendors (each its own payee) speaking the given x402 versions."""
    servers: list[LocalServer] = []

    def open_shop(versions: tuple[int, ...], **faults: Any) -> Shop:
        vendor_id = f"v{len(servers)}-{request.node.name}"[:60]
        vendor = Vendor(
            vendor_id=vendor_id,
            name="Shop",
            endpoint="http://127.0.0.1:1",
            base_price_per_hour=usd_to_micros(1.4),
            reliability_score=0.9,
            supported_gpu_types=["A100"],
            pay_to=vendor_payee(vendor_id),
            network=net.chain.network,
            asset=net.chain.token_address,
            credential=net.keyring.encrypt(SECRET),
        )
        cfg = mock_vendor_config(vendor, net.facilitator.url, SECRET, x402_versions=versions)
        server = start_mock_vendor(cfg, net.facilitator.url)
        servers.append(server)
        vendor.endpoint = server.url
        if faults:
            httpx.post(
                f"{server.url}/admin/faults",
                json=faults,
                headers={"Authorization": f"Bearer {SECRET}"},
            ).raise_for_status()
        return Shop(vendor, server)

    yield open_shop
    for server in servers:
        server.stop()


def funded(net: Net) -> LocalAccount:
    account: LocalAccount = Account.create()
    net.chain.mint(account.address, usd_to_micros(20))
    return account


def paid_to(net: Net, payee: str) -> list[int]:
    return [
        t["value"]
        for t in net.chain.transfers()
        if t["from"] != ZERO and t["to"].lower() == payee.lower()
    ]


async def buy(
    net: Net, shop: Shop, account: LocalAccount, payment_id: str, key: str, **limits: Any
) -> Submitted:
    """Quote one hour and submit it, paying the 402 under the registry's limits."""
    client = VendorClient(net.keyring)
    try:
        quote = await client.quote(shop.vendor, JobSpec(gpu_type="A100", hours=1))
        payer = build_payer(
            account,
            payment_nonce(payment_id),
            PaymentLimits(
                max_amount=limits.get("max_amount", quote.amount),
                pay_to=shop.vendor.pay_to,
                asset=shop.vendor.asset,
                network=shop.vendor.network,
            ),
        )
        return await client.submit(
            shop.vendor, quote.quote_id, idempotency_key=key, job_params={}, payer=payer
        )
    finally:
        await client.aclose()


@pytest.mark.parametrize("versions", [(1,), (2,), (1, 2)], ids=["v1", "v2", "both"])
@pytest.mark.parametrize("lowercase", [False, True], ids=["checksummed", "lowercase"])
def test_paid_once_settled_and_replayed_unpaid(
    net: Net, shop: Any, versions: tuple[int, ...], lowercase: bool
) -> None:
    s = shop(versions, lowercase_addresses=lowercase)
    account = funded(net)

    first = asyncio.run(buy(net, s, account, "pay-1", "job-1"))
    assert first.tx_hash and first.settled_amount == 1_400_000
    assert not first.replayed
    # The first paid answer already says what was paid for (it said 0.0 before the fix).
    assert first.job.paid_hours == 1.0
    assert first.job.status == "running"

    again = asyncio.run(buy(net, s, account, "pay-1", "job-1"))
    assert again.replayed and again.job.job_id == first.job.job_id
    assert again.job.paid_hours == 1.0
    assert paid_to(net, s.vendor.pay_to or "") == [1_400_000]
    assert net.chain.balance_of(account.address) == usd_to_micros(20) - 1_400_000


@pytest.mark.parametrize("versions", [(1,), (2,)], ids=["v1", "v2"])
def test_one_payment_settles_once_even_for_a_second_job(
    net: Net, shop: Any, versions: tuple[int, ...]
) -> None:
    """The nonce comes from the payment's id: a second job paid by the same payment is refused
    by the chain, so the money moves once."""
    s = shop(versions)
    account = funded(net)
    asyncio.run(buy(net, s, account, "pay-once", "job-a"))
    with pytest.raises(PaymentRefused) as refused:
        asyncio.run(buy(net, s, account, "pay-once", "job-b"))
    assert refused.value.payment_sent
    assert paid_to(net, s.vendor.pay_to or "") == [1_400_000]


GUARDS = {
    "overcharge": ({"overcharge_factor": 1.5}, "402 asks $2.10, more than the quoted $1.40"),
    "payee": ({"foreign_payee": True}, f"402 pays {FOREIGN_PAYEE}, not the vendor's"),
    "asset": ({"foreign_asset": True}, f"402 asks asset {FOREIGN_ASSET}, not the"),
    "network": ({"foreign_network": True}, "402 asks network "),
}


@pytest.mark.parametrize("versions", [(1,), (2,)], ids=["v1", "v2"])
@pytest.mark.parametrize("name", list(GUARDS))
def test_guardrails_refuse_before_signing(
    net: Net, shop: Any, versions: tuple[int, ...], name: str
) -> None:
    faults, reason = GUARDS[name]
    s = shop(versions, **faults)
    account = funded(net)
    with pytest.raises(PaymentRefused) as refused:
        asyncio.run(buy(net, s, account, f"pay-{name}", f"job-{name}"))
    assert not refused.value.payment_sent
    limits = PaymentLimits(1_400_000, s.vendor.pay_to, s.vendor.asset, s.vendor.network)
    reasons = [check_requirements(o, limits) for o in refused.value.offered]
    assert any(r and reason in r for r in reasons), reasons
    assert net.chain.balance_of(account.address) == usd_to_micros(20)


def test_v1_client_of_v2_only_vendor_and_back_are_told(net: Net, shop: Any) -> None:
    """A vendor answers a payment in a version it does not speak with a clear 400."""
    v2_only = shop((2,))
    answer = httpx.post(
        f"{v2_only.server.url}/submit-job",
        json={"quoteId": "q"},
        headers={"Authorization": f"Bearer {SECRET}", "Idempotency-Key": "k", "X-PAYMENT": "e30="},
    )
    assert answer.status_code == 400 and "version 2 only" in answer.text
    v1_only = shop((1,))
    unpaid = httpx.post(
        f"{v1_only.server.url}/submit-job",
        json={"quoteId": "q"},
        headers={"Authorization": f"Bearer {SECRET}", "Idempotency-Key": "k"},
    )
    assert unpaid.status_code == 402 and "PAYMENT-REQUIRED" not in unpaid.headers
    body = unpaid.json()
    assert body["x402Version"] == 1
    assert body["accepts"][0]["maxAmountRequired"] == str(usd_to_micros(1.4))
    assert body["accepts"][0]["network"] == net.chain.network  # no legacy name: CAIP-2


def requirement(**fields: Any) -> Any:
    from x402.schemas.v1 import PaymentRequirementsV1

    base = {
        "scheme": "exact",
        "network": "base-sepolia",
        "max_amount_required": "1000",
        "resource": "http://x/submit-job",
        "pay_to": "0x" + "ab" * 20,
        "max_timeout_seconds": 300,
        "asset": "0x" + "cd" * 20,
    }
    return PaymentRequirementsV1(**{**base, **fields})


def test_check_requirements_compares_hex_and_chains() -> None:
    limits = PaymentLimits(1000, "0x" + "AB" * 20, "0x" + "Cd" * 20, "eip155:84532")
    assert check_requirements(requirement(), limits) is None  # legacy name, lowercase hex
    assert check_requirements(requirement(network="eip155:84532"), limits) is None
    assert "not the registered network" in (
        check_requirements(requirement(network="base"), limits) or ""
    )
    assert "not an address" in (check_requirements(requirement(pay_to="0xabg"), limits) or "")
    assert "not an address" in (
        check_requirements(requirement(asset="0x" + "zz" * 20), limits) or ""
    )
    assert "malformed amount" in (
        check_requirements(requirement(max_amount_required="1e3"), limits) or ""
    )
    assert "more than the quoted" in (
        check_requirements(requirement(max_amount_required="1001"), limits) or ""
    )


def test_chain_signer_checksums_addresses() -> None:
    """The facilitator's signer checksums addresses before web3 sees them (a lowercase `to`
    failed the transfer simulation before); other arguments pass unchanged."""
    from eth_utils import to_checksum_address

    from procure.payments.chain_facilitator import checksum_args

    lower, nonce = "0x" + "ab" * 20, "0x" + "ab" * 32
    assert checksum_args([lower, 5, nonce]) == [to_checksum_address(lower), 5, nonce]
