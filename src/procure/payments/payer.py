"""The x402 payer: the official SDK client, signing EIP-3009 with a nonce derived from the
payment's own id (so a retried payment can never settle twice), behind the agent's guardrails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from x402 import x402Client
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload
from x402.schemas import AbortResult, PaymentRequirements

from procure.models import format_usd


def payment_nonce(payment_id: str) -> str:
    """The EIP-3009 nonce of a payment: a pure function of its id, stable across retries."""
    return "0x" + keccak(text=f"procure-payment:{payment_id}").hex()


class FixedNonceExactEvmScheme(ExactEvmScheme):
    """The SDK's exact EVM client scheme, with the authorisation nonce fixed by the caller."""

    def __init__(self, signer: LocalAccount, nonce: str) -> None:
        super().__init__(signer)
        self._nonce = nonce

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
            valid_before=str(int(time.time()) + (requirements.max_timeout_seconds or 300)),
            nonce=self._nonce,
        )
        signature = self._sign_authorization(authorization, requirements)
        return ExactEIP3009Payload(authorization=authorization, signature=signature).to_dict()


@dataclass(frozen=True)
class PaymentLimits:
    """What the agent agreed to: at most `max_amount` micro-units, to this payee, asset, network."""

    max_amount: int
    pay_to: str | None
    asset: str | None
    network: str


def check_requirements(req: Any, limits: PaymentLimits) -> str | None:
    """Why a 402's requirements break the limits, or None when they are acceptable."""
    amount = int(req.amount)
    if amount > limits.max_amount:
        return (
            f"402 asks {format_usd(amount)}, more than the quoted {format_usd(limits.max_amount)}"
        )
    if limits.pay_to and req.pay_to.lower() != limits.pay_to.lower():
        return f"402 pays {req.pay_to}, not the vendor's registered payee {limits.pay_to}"
    if limits.asset and req.asset.lower() != limits.asset.lower():
        return f"402 asks asset {req.asset}, not the registered asset {limits.asset}"
    if req.network != limits.network:
        return f"402 asks network {req.network}, not the registered network {limits.network}"
    return None


def build_payer(account: LocalAccount, nonce: str, limits: PaymentLimits) -> x402Client:
    """An x402 client that pays at most once, only what `limits` allow, with `nonce`."""
    client = x402Client()
    # Register for every EVM chain so a 402 on a foreign network reaches the guard below
    # and is refused with its reason, rather than matching nothing.
    client.register("eip155:*", FixedNonceExactEvmScheme(account, nonce))
    allowed = [
        {
            "network": limits.network,
            "asset": limits.asset or "",
            "max_amount_per_payment": str(limits.max_amount),
        }
    ]
    client.set_spend_controls(
        {"max_amount_per_payment": False, "allowed_assets": allowed}
        if limits.asset
        else {"max_amount_per_payment": False, "allowed_assets": True}
    )

    def guard(context: Any) -> AbortResult | None:
        reason = check_requirements(context.selected_requirements, limits)
        return AbortResult(reason=reason) if reason else None

    client.on_before_payment_creation(guard)
    return client
