"""The x402 payer: the official SDK client, signing EIP-3009 with a nonce derived from the
payment's own id (so a retried payment can never settle twice), behind the agent's guardrails.
It pays x402 v2 vendors (`PAYMENT-REQUIRED` header) and v1 vendors (402 with a JSON body,
`X-PAYMENT`) alike, under the same limits.

The authorisation's whole content is fixed by the payment record: nonce from its id,
`validBefore` from its creation time (`authorization_deadline`). A retry after a crash therefore
signs the very same authorisation (EIP-712 signing is deterministic), and once `validBefore`
has passed unused, no copy of it, sent or not, can ever move money.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from eth_hash.auto import keccak

from procure.crashpoints import crash_point
from procure.models import format_usd

# The SDK's EVM code (web3, eth_account: about 1 s of CPU) is imported at the first payment,
# not at every start: `procure serve`, `run cancel` and an idle worker never sign anything.
if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from x402 import x402Client
    from x402.schemas import PaymentRequirements
    from x402.schemas.v1 import PaymentRequirementsV1


def payment_nonce(payment_id: str) -> str:
    """The EIP-3009 nonce of a payment: a pure function of its id, stable across retries."""
    return "0x" + keccak(f"procure-payment:{payment_id}".encode()).hex()


def authorization_deadline(created_at: datetime, window_s: float) -> int:
    """A payment's EIP-3009 `validBefore` (unix seconds): `window_s` after the payment was made."""
    return int(created_at.timestamp()) + int(window_s)


_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HEX = re.compile(r"^0x[0-9a-fA-F]{1,64}$")


@functools.cache
def _v1_chain_ids() -> dict[str, int]:
    """The SDK's x402 v1 legacy network names and their chain ids."""
    from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS

    return dict(V1_NETWORK_CHAIN_IDS)


@functools.cache
def _legacy_names() -> dict[str, str]:
    return {f"eip155:{chain}": name for name, chain in _v1_chain_ids().items()}


def is_hex_address(value: object) -> bool:
    """A 20-byte hex address, in any letter case (vendors send lowercase ones too)."""
    return isinstance(value, str) and bool(_HEX_ADDRESS.match(value))


def same_address(a: str, b: str) -> bool:
    """Two addresses are one when their hex is: letter case (the EIP-55 checksum) aside.
    (The signer refuses anything but 20 bytes; this compares what the registry holds.)"""
    return all(isinstance(x, str) and _HEX.match(x) for x in (a, b)) and a.lower() == b.lower()


def caip2_network(network: str) -> str:
    """A network as CAIP-2 (`eip155:<chain id>`): x402 v1 vendors name known chains by legacy
    names (`base-sepolia`), which are mapped; any other name is returned unchanged."""
    chain = _v1_chain_ids().get(network)
    return f"eip155:{chain}" if chain is not None else network


def legacy_network(network: str) -> str | None:
    """The x402 v1 legacy name of a CAIP-2 network, if it has one."""
    return _legacy_names().get(network)


def _checksummed(requirements: PaymentRequirements) -> PaymentRequirements:
    """The requirements with payee and asset in EIP-55 form, as the TypeScript client signs
    them (viem's getAddress): a lowercase `payTo` or asset is paid, not refused."""
    from eth_utils import to_checksum_address

    return requirements.model_copy(
        update={
            "pay_to": to_checksum_address(requirements.pay_to),
            "asset": to_checksum_address(requirements.asset),
            "extra": dict(requirements.extra or {}),  # the SDK's signer writes into it
        }
    )


def v2_requirements(req: PaymentRequirementsV1) -> PaymentRequirements:
    """A v1 requirement in v2 terms (what the EVM 'exact' scheme signs is the same)."""
    from x402.schemas import PaymentRequirements

    extra: Any = req.extra or {}
    if isinstance(extra, str):  # some v1 vendors send `extra` as a JSON string
        extra = json.loads(extra)
    return PaymentRequirements(
        scheme=req.scheme,
        network=caip2_network(req.network),
        asset=req.asset,
        amount=req.max_amount_required,
        pay_to=req.pay_to,
        max_timeout_seconds=req.max_timeout_seconds,
        extra=extra if isinstance(extra, dict) else {},
    )


@functools.cache
def _fixed_nonce_scheme() -> type[Any]:
    """`FixedNonceExactEvmScheme`, defined at its first use: it subclasses the SDK's scheme,
    whose import loads web3."""
    from x402.mechanisms.evm.exact import ExactEvmScheme
    from x402.mechanisms.evm.types import ExactEIP3009Authorization, ExactEIP3009Payload

    class FixedNonceExactEvmScheme(ExactEvmScheme):
        """The SDK's exact EVM client scheme, with the authorisation's nonce and `validBefore`
        fixed by the caller, so that every attempt at one payment signs the same
        authorisation."""

        def __init__(self, signer: LocalAccount, nonce: str, valid_before: int) -> None:
            super().__init__(signer)
            self._nonce = nonce
            self._valid_before = valid_before

        def create_payment_payload(
            self, requirements: PaymentRequirements, extensions: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            if (requirements.extra or {}).get("assetTransferMethod") == "permit2":
                raise ValueError("permit2 payments are not supported: EIP-3009 only")
            if not (is_hex_address(requirements.pay_to) and is_hex_address(requirements.asset)):
                raise ValueError("payee and asset must be 20-byte hex addresses")
            requirements = _checksummed(requirements)
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

    return FixedNonceExactEvmScheme


class FixedNonceExactEvmSchemeV1:
    """The same authorisation for x402 v1 vendors: their requirements are turned into v2 terms
    and signed by the v2 scheme, so the nonce, `validBefore` and guardrails are one."""

    scheme = "exact"

    def __init__(self, v2: Any) -> None:  # a `_fixed_nonce_scheme()`
        self._v2 = v2

    def create_payment_payload(self, requirements: PaymentRequirementsV1) -> dict[str, Any]:
        return self._v2.create_payment_payload(v2_requirements(requirements))


@dataclass(frozen=True)
class PaymentLimits:
    """What the agent agreed to: at most `max_amount` micro-units (the quote, itself within the
    run's budget), to the payee, in the asset, on the network that the vendor registry holds.
    A vendor registered without one of them cannot be paid at all (fail closed)."""

    max_amount: int
    pay_to: str | None
    asset: str | None
    network: str | None


def registration_gap(limits: PaymentLimits) -> str | None:
    """Why the registry's record of a vendor cannot be paid at all (no payee, asset or
    network), with what the operator does about it; None when it is complete. The operator's
    mistake, not the vendor's: the agent does not count it as a failure of the vendor."""
    for what, value in (
        ("payee", limits.pay_to),
        ("asset", limits.asset),
        ("network", limits.network),
    ):
        if not value:
            return (
                f"the vendor registry has no {what} for this vendor: it cannot be paid. Register "
                "it again with payTo, network and asset (PUT or PATCH /api/vendors/VENDOR_ID; "
                "`procure vendors list --json` shows a seeded vendor's), then "
                "`procure vendors clear-cooldown VENDOR_ID`"
            )
    return None


def check_requirements(req: Any, limits: PaymentLimits) -> str | None:
    """Why a 402's requirements (v1 or v2) break the limits, or None when they are acceptable.

    Addresses are compared by their hex, letter case aside, once both are well-formed; v1
    legacy network names are compared as the chain they name."""
    gap = registration_gap(limits)
    if gap is not None:
        return gap
    assert limits.pay_to and limits.asset and limits.network
    raw_amount = req.amount if hasattr(req, "amount") else req.max_amount_required
    if not (isinstance(raw_amount, str) and raw_amount.isdecimal() and len(raw_amount) <= 78):
        return f"402 asks a malformed amount {str(raw_amount)[:80]!r}"
    amount = int(raw_amount)
    if amount > limits.max_amount:
        return (
            f"402 asks {format_usd(amount)}, more than the quoted {format_usd(limits.max_amount)}"
        )
    if not (isinstance(req.pay_to, str) and _HEX.match(req.pay_to)):
        return f"402 pays {str(req.pay_to)[:80]!r}, which is not an address"
    if not same_address(req.pay_to, limits.pay_to):
        return f"402 pays {req.pay_to}, not the vendor's registered payee {limits.pay_to}"
    if not (isinstance(req.asset, str) and _HEX.match(req.asset)):
        return f"402 asks asset {str(req.asset)[:80]!r}, which is not an address"
    if not same_address(req.asset, limits.asset):
        return f"402 asks asset {req.asset}, not the registered asset {limits.asset}"
    if caip2_network(req.network) != caip2_network(limits.network):
        return f"402 asks network {req.network}, not the registered network {limits.network}"
    return None


def build_payer(
    account: LocalAccount, nonce: str, limits: PaymentLimits, *, valid_before: int | None = None
) -> x402Client:
    """An x402 client that pays at most once, only what `limits` allow, with `nonce`, by an
    authorisation valid until `valid_before` (unix seconds; the agent derives it from the
    payment with `authorization_deadline`, default: five minutes from now)."""
    from x402 import x402Client
    from x402.schemas import AbortResult

    if valid_before is None:
        valid_before = int(time.time()) + 300
    client = x402Client()
    scheme = _fixed_nonce_scheme()(account, nonce, valid_before)
    # Register for every EVM chain, v2 and v1 (CAIP-2 and legacy names), so a 402 on a foreign
    # network reaches the guard below and is refused with its reason, rather than matching
    # nothing.
    client.register("eip155:*", scheme)
    v1 = FixedNonceExactEvmSchemeV1(scheme)
    client.register_v1("eip155:*", v1)  # type: ignore[arg-type]
    for name in _v1_chain_ids():
        client.register_v1(name, v1)  # type: ignore[arg-type]
    # The SDK's own spend controls hold the same limits: one asset on one network (by either
    # of its names), capped at the quote. A 402 outside them matches nothing; the caller
    # explains why (check_requirements).
    network = caip2_network(limits.network or "")
    allowed = [
        {
            "network": name,
            "asset": limits.asset or "",
            "max_amount_per_payment": str(limits.max_amount),
        }
        for name in filter(None, {network, legacy_network(network)})
    ]
    client.set_spend_controls({"max_amount_per_payment": False, "allowed_assets": allowed})

    def guard(context: Any) -> AbortResult | None:
        reason = check_requirements(context.selected_requirements, limits)
        return AbortResult(reason=reason) if reason else None

    client.on_before_payment_creation(guard)
    return client
