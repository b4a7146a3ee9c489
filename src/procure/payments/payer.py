"""The x402 payer: the official SDK client, signing EIP-3009 with a nonce derived from the
payment's own id (so a retried payment can never settle twice), behind the agent's guardrails.

The authorisation's whole content is fixed by the payment record: nonce from its id,
`validBefore` from its creation time (`authorization_deadline`). A retry after a crash therefore
signs the very same authorisation (EIP-712 signing is deterministic), and once `validBefore`
has passed unused, no copy of it, sent or not, can ever move money.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from x402 import x402Client
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload
from x402.schemas import AbortResult, PaymentRequirements

from procure.crashpoints import crash_point
from procure.models import format_usd


def payment_nonce(payment_id: str) -> str:
    """The EIP-3009 nonce of a payment: a pure function of its id, stable across retries."""
    return "0x" + keccak(text=f"procure-payment:{payment_id}").hex()


def authorization_deadline(created_at: datetime, window_s: float) -> int:
    """A payment's EIP-3009 `validBefore` (unix seconds): `window_s` after the payment was made."""
    return int(created_at.timestamp()) + int(window_s)


class FixedNonceExactEvmScheme(ExactEvmScheme):
    """The SDK's exact EVM client scheme, with the authorisation's nonce and `validBefore` fixed
    by the caller, so that every attempt at one payment signs the same authorisation."""

    def __init__(self, signer: LocalAccount, nonce: str, valid_before: int) -> None:
        super().__init__(signer)
        self._nonce = nonce
        self._valid_before = valid_before

    def create_payment_payload(
        self, requirements: PaymentRequirements, extensions: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if (requirements.extra or {}).get("assetTransferMethod") == "permit2":
            raise ValueError("permit2 payments are not supported: EIP-3009 only")
        authorization = ExactEIP3009Authorization(
            from_address=self._signer.address,
            to=requirements.pay_to,
            value=requirements.amount,
            valid_after="0",
            valid_before=str(self._valid_before),
            nonce=self._nonce,
        )
        signature = self._sign_authorization(authorization, requirements)
        crash_point("signed")
        return ExactEIP3009Payload(authorization=authorization, signature=signature).to_dict()


@dataclass(frozen=True)
class PaymentLimits:
    """What the agent agreed to: at most `max_amount` micro-units (the quote, itself within the
    run's budget), to the payee, in the asset, on the network that the vendor registry holds.
    A vendor registered without one of them cannot be paid at all (fail closed)."""

    max_amount: int
    pay_to: str | None
    asset: str | None
    network: str | None


def check_requirements(req: Any, limits: PaymentLimits) -> str | None:
    """Why a 402's requirements break the limits, or None when they are acceptable."""
    for what, value in (("payee", limits.pay_to), ("asset", limits.asset)):
        if not value:
            return f"the vendor registry has no {what} for this vendor: it cannot be paid"
    if not limits.network:
        return "the vendor registry has no network for this vendor: it cannot be paid"
    assert limits.pay_to and limits.asset
    amount = int(req.amount)
    if amount > limits.max_amount:
        return (
            f"402 asks {format_usd(amount)}, more than the quoted {format_usd(limits.max_amount)}"
        )
    if req.pay_to.lower() != limits.pay_to.lower():
        return f"402 pays {req.pay_to}, not the vendor's registered payee {limits.pay_to}"
    if req.asset.lower() != limits.asset.lower():
        return f"402 asks asset {req.asset}, not the registered asset {limits.asset}"
    if req.network != limits.network:
        return f"402 asks network {req.network}, not the registered network {limits.network}"
    return None


def build_payer(
    account: LocalAccount, nonce: str, limits: PaymentLimits, *, valid_before: int | None = None
) -> x402Client:
    """An x402 client that pays at most once, only what `limits` allow, with `nonce`, by an
    authorisation valid until `valid_before` (unix seconds; the agent derives it from the
    payment with `authorization_deadline`, default: five minutes from now)."""
    if valid_before is None:
        valid_before = int(time.time()) + 300
    client = x402Client()
    # Register for every EVM chain so a 402 on a foreign network reaches the guard below
    # and is refused with its reason, rather than matching nothing.
    client.register("eip155:*", FixedNonceExactEvmScheme(account, nonce, valid_before))
    # The SDK's own spend controls hold the same limits: one asset on one network, capped at
    # the quote. A 402 outside them matches nothing; the caller explains why (check_requirements).
    allowed = [
        {
            "network": limits.network or "",
            "asset": limits.asset or "",
            "max_amount_per_payment": str(limits.max_amount),
        }
    ]
    client.set_spend_controls({"max_amount_per_payment": False, "allowed_assets": allowed})

    def guard(context: Any) -> AbortResult | None:
        reason = check_requirements(context.selected_requirements, limits)
        return AbortResult(reason=reason) if reason else None

    client.on_before_payment_creation(guard)
    return client
