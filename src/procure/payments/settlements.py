"""Asking the facilitator whether a payment's nonce was already settled (crash reconciliation),
and what the agent's wallet holds (so an unfunded wallet is told, not signed for)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Settlement:
    used: bool
    transaction: str | None
    amount: int | None = None  # what moved, in atomic units (micro-USD), when known


class SettlementLookupError(Exception):
    """The facilitator could not say; the caller must not guess."""


class FacilitatorLedger:
    """Reads the local facilitator's settlement records over HTTP."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(
            base_url=url, transport=transport or httpx.AsyncHTTPTransport(), timeout=10
        )

    async def lookup(self, payer: str, nonce: str) -> Settlement:
        try:
            response = await self._http.get(f"/authorizations/{payer}/{nonce}")
            response.raise_for_status()
            data = response.json()
            amount = data.get("amount")
            return Settlement(
                used=bool(data["used"]),
                transaction=data.get("transaction"),
                amount=int(amount) if amount is not None else None,
            )
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise SettlementLookupError(f"facilitator lookup failed: {exc}") from exc

    async def balance(self, address: str) -> int:
        """The wallet's token balance in atomic units (micro-USD)."""
        try:
            response = await self._http.get(f"/balance/{address}")
            response.raise_for_status()
            return int(response.json()["atomic"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise SettlementLookupError(f"facilitator balance lookup failed: {exc}") from exc

    async def aclose(self) -> None:
        await self._http.aclose()
