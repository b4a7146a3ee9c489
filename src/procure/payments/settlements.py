"""Asking the facilitator whether a payment's nonce was already settled (crash reconciliation),
what the agent's wallet holds (so an unfunded wallet is told, not signed for), and whether a
failed settlement was the facilitator's refusal or an outcome still unknown."""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

from procure.bounds import UnsafeInput, loads
from procure.httpbounds import bounded_client
from procure.safetext import outside


@dataclass(frozen=True)
class Settlement:
    used: bool
    transaction: str | None
    amount: int | None = None  # what moved, in atomic units (micro-USD), when known
    pay_to: str | None = None  # to whom it moved, when known


def paid_to(found: Settlement, pay_to: str, amount: int) -> bool:
    """Whether the used nonce in `found` paid `amount` to `pay_to`: a buyer chooses the nonce,
    so it can spend the one it signed for a seller on another transfer (to itself, for less),
    and a seller must not book that as its payment."""
    return (
        found.used
        and found.pay_to is not None
        and found.pay_to.lower() == pay_to.lower()
        and found.amount == amount
    )


def _what(exc: Exception) -> str:
    """What went wrong, without the facilitator's URL: httpx's messages carry it, and its
    `user:password@` with it (the text reaches pages and observations)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return outside(f"{type(exc).__name__}: {exc}", 200)


class SettlementLookupError(Exception):
    """The facilitator could not say; the caller must not guess."""


class FacilitatorLedger:
    """Reads the local facilitator's settlement records over HTTP."""

    def __init__(
        self,
        url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._http = bounded_client(
            deadline_s=timeout_s, max_bytes=64 << 10, transport=transport, base_url=url
        )

    async def lookup(self, payer: str, nonce: str) -> Settlement:
        try:
            response = await self._http.get(f"/authorizations/{payer}/{nonce}")
            response.raise_for_status()
            data = loads(response.content)
            amount = data.get("amount")
            transaction = data.get("transaction")
            if transaction is not None and not isinstance(transaction, str):
                raise ValueError("transaction is not a string")
            pay_to = data.get("payTo")
            if pay_to is not None and not isinstance(pay_to, str):
                raise ValueError("payTo is not a string")
            return Settlement(
                used=bool(data["used"]),
                transaction=transaction[:200] if transaction else transaction,
                amount=int(amount) if amount is not None else None,
                pay_to=pay_to[:100] if pay_to else None,
            )
        except (
            httpx.HTTPError,
            UnsafeInput,
            ValueError,
            OverflowError,  # an amount of 1e400
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            raise SettlementLookupError(f"facilitator lookup failed: {_what(exc)}") from exc

    async def balance(self, address: str) -> int:
        """The wallet's token balance in atomic units (micro-USD)."""
        try:
            response = await self._http.get(f"/balance/{address}")
            response.raise_for_status()
            return int(loads(response.content)["atomic"])
        except (
            httpx.HTTPError,
            UnsafeInput,
            ValueError,
            OverflowError,
            KeyError,
            TypeError,
        ) as exc:
            raise SettlementLookupError(f"facilitator balance lookup failed: {_what(exc)}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()


# The facilitator's own refusals are reason codes (`invalid_exact_evm_insufficient_balance`,
# procure's `invalid_request: ...`); a settle call that failed (timeout, transport, 5xx) is
# reported by the SDK as its exception's text. These codes leave the outcome open.
_UNSURE = frozenset(
    {"unexpected_settle_error", "settlement_pending", "invalid_exact_evm_nonce_already_used"}
)
_CODE = re.compile(r"[a-z][a-z0-9_]*")


def settle_refused(reason: str | None) -> bool:
    """Whether a failed settlement's `error_reason` is the facilitator's definite refusal
    (nothing moved), not a call that failed with its outcome unknown."""
    code = (reason or "").split(": ", 1)[0]
    return bool(_CODE.fullmatch(code)) and code not in _UNSURE
