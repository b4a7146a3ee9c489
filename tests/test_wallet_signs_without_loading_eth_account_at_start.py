"""The agent's wallet is the key and its address, derived without eth_account; eth_account is
loaded at the first signature. What a user sees is unchanged: the same address for the same key
(the kept file, X402_PRIVATE_KEY in any case, with or without 0x), the same signature, the same
refusal of a malformed kept key, and never the key in what the wallet shows of itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from x402.schemas import PaymentRequirements

from procure.payments.payer import _fixed_nonce_scheme, payment_nonce
from procure.payments.wallet import load_or_create_account, wallet_from_key
from procure.vendors.registry import vendor_payee

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"


def test_the_address_is_eth_accounts_for_every_form_of_the_key() -> None:
    for _ in range(50):
        account = Account.create()
        plain = bytes(account.key).hex()
        for text in (plain, "0x" + plain, plain.upper(), "0x" + plain.upper()):
            assert wallet_from_key(text).address == account.address, text


def test_a_kept_key_and_a_new_one_are_eth_accounts_and_the_key_is_never_shown(
    tmp_path: Path,
) -> None:
    made = load_or_create_account(None, tmp_path)
    key = (tmp_path / "wallet.key").read_text().strip()
    assert len(key) == 64 and int(key, 16) > 0  # the file's form is as it was: 64 hex digits
    assert made.address == Account.from_key(key).address
    assert load_or_create_account(None, tmp_path).address == made.address  # kept, not remade
    assert key not in repr(made) and key not in str(made)


@pytest.mark.parametrize(
    "kept", ["0x" + "ab" * 31, "zz" * 32, "", "0x" + "0" * 64, "f" * 64], ids=repr
)
def test_a_malformed_kept_key_is_refused_as_eth_account_refused_it(
    tmp_path: Path, kept: str
) -> None:
    (tmp_path / "wallet.key").write_text(kept)
    with pytest.raises(Exception) as expected:
        Account.from_key(kept)
    with pytest.raises(type(expected.value)) as got:
        load_or_create_account(None, tmp_path)
    assert str(got.value) == str(expected.value)


def test_the_wallet_signs_the_very_authorisation_eth_account_signs() -> None:
    """The same EIP-3009 authorisation, byte for byte, as the SDK's own eth_account signer:
    a payment retried across the change still signs what it signed before."""
    account = Account.create()
    wallet = wallet_from_key(bytes(account.key).hex())
    requirements = PaymentRequirements(
        scheme="exact",
        network="eip155:84532",
        asset=ASSET,
        amount="1500000",
        pay_to=vendor_payee("gpu_vendor_1").lower(),
        max_timeout_seconds=300,
        extra={"name": "USDC", "version": "2"},
    )
    nonce = payment_nonce("pay-1")
    signed = [
        _fixed_nonce_scheme()(signer, nonce, 1_900_000_000).create_payment_payload(requirements)
        for signer in (account, wallet)
    ]
    assert signed[0] == signed[1]
    assert signed[1]["authorization"]["from"] == account.address


def test_the_mock_vendors_payees_are_as_they_were() -> None:
    """Derived without eth_account now: the seeds' registry and a running mock vendor agree with
    stores seeded before."""
    from eth_utils import keccak

    for vendor in ("gpu_vendor_1", "gpu_vendor_2", "any"):
        key = keccak(text=f"procure-mock-vendor:{vendor}")
        assert vendor_payee(vendor) == Account.from_key(key).address
