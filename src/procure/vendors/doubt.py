"""A seller's payments whose settlement outcome is unknown (the settle call timed out or failed,
yet the facilitator may have settled): asked of the facilitator's ledger, now and in the
background, until they are found settled or can no longer settle. Never forgotten paid."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import JSONResponse, Response
from x402.http.utils import decode_payment_response_header, decode_payment_signature_header

from procure.payments.settlements import (
    FacilitatorLedger,
    SettlementLookupError,
    paid_to,
    settle_refused,
)
from procure.payments.x402v1 import PAYMENT_RESPONSE, PAYMENT_SIGNATURE, X_PAYMENT
from procure.vendors.protocol import IDEMPOTENCY_HEADER

DOUBT_MAX_S = 300.0  # watched at most this long (the 402's max_timeout_seconds)
RETRY_AFTER_S = 2
UNSURE_MESSAGE = (
    "the payment's settlement could not be confirmed; it is being checked with the "
    f"facilitator: retry with the same {IDEMPOTENCY_HEADER} in {RETRY_AFTER_S} s "
    "(it is never charged twice)"
)
Outcome = Literal["used", "refused", "open"]


def retry_later(message: str, status: int = 503) -> JSONResponse:
    body = {"error": message, "retryAfterSeconds": RETRY_AFTER_S}
    return JSONResponse(body, status, headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class Doubt:
    """A verified payment whose settlement's outcome is unknown."""

    kind: str  # "submit" or "renew"
    key: str  # the request's idempotency key
    payer: str
    nonce: str
    until: float  # unix time after which it can no longer settle (validBefore, bounded)
    pay_to: str = ""  # to whom and how much it pays: a nonce used by another transfer is not it
    amount: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.key}"


def doubt_of(kind: str, key: str, headers: Any) -> Doubt | None:
    """The doubt about the payment in a request's headers (v2 or v1), or None if it has none."""
    header = headers.get(PAYMENT_SIGNATURE) or headers.get(X_PAYMENT)
    try:
        auth = decode_payment_signature_header(header).payload["authorization"]
        until = min(float(auth["validBefore"]), time.time() + DOUBT_MAX_S)
        return Doubt(
            kind,
            key,
            str(auth["from"]),
            str(auth["nonce"]),
            until,
            str(auth["to"]),
            int(auth["value"]),
        )
    except Exception:
        return None


class Doubts:
    """The payments in doubt of one seller. `lock_of(d)` is the lock its key's requests hold;
    `settled(d)` starts what it paid for; `forget(d)` drops it (it can no longer settle). Both
    are called with that lock held."""

    def __init__(
        self,
        ledger: FacilitatorLedger | None,
        lock_of: Callable[[Doubt], asyncio.Lock],
        settled: Callable[[Doubt], None],
        forget: Callable[[Doubt], None],
    ) -> None:
        self.ledger, self.lock_of, self.settled, self.forget = ledger, lock_of, settled, forget
        self.open: dict[str, Doubt] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    async def _used(self, d: Doubt) -> bool | None:
        if self.ledger is None:
            return None
        try:
            found = await self.ledger.lookup(d.payer, d.nonce)
        except SettlementLookupError:
            return None
        # Used by another transfer (the buyer chose the nonce): it can never pay us now.
        return paid_to(found, d.pay_to, d.amount)

    async def after_failed_settle(self, d: Doubt | None, response: Response) -> Outcome:
        """The route answered 200 and no settlement came back: `used` (the ledger shows the
        money moved: start it), `refused` (the facilitator said no, or nobody can be asked:
        drop it) or `open` (watched in the background until it settles or can no longer)."""
        if d is None or self.ledger is None:
            return "refused"
        found = await self._used(d)
        if found:
            return "used"
        header = response.headers.get(PAYMENT_RESPONSE)
        try:
            answer = decode_payment_response_header(header) if header else None
        except Exception:
            answer = None
        if found is False and answer is not None and settle_refused(answer.error_reason):
            return "refused"
        self.open[d.name] = d
        task = asyncio.create_task(self._watch(d))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return "open"

    async def resolve(self, kind: str, key: str) -> JSONResponse | None:
        """Before a request with `key` (its lock held): a payment of it in doubt is asked about
        now (settled → started; expired → dropped); still open → the answer to give (409,
        come back later: never paid twice). None: go on."""
        d = self.open.get(f"{kind}:{key}")
        if d is None or not await self._settle(d):
            return None
        return retry_later(
            f"the payment for this {IDEMPOTENCY_HEADER} is still being settled; "
            f"retry in {RETRY_AFTER_S} s",
            409,
        )

    async def _settle(self, d: Doubt) -> bool:
        """Ask once more about `d` (its lock held). Whether it is still in doubt."""
        if self.open.get(d.name) is not d:
            return False
        found = await self._used(d)
        now = time.time()
        # Forgotten only once the ledger said unused past the authorisation's end: while it
        # cannot be asked, the money may have moved (given up a window later, to stay bounded).
        unanswered = found is None and now <= d.until + DOUBT_MAX_S
        if unanswered or (found is False and now <= d.until):
            return True
        del self.open[d.name]
        if found:
            self.settled(d)
        else:
            self.forget(d)
        return False

    async def _watch(self, d: Doubt) -> None:
        # Its own task: other keys never wait for it, and it ends with the authorisation.
        pause = 0.2
        while True:
            left = d.until - time.time()
            await asyncio.sleep(min(pause, left + 0.5) if left > 0 else pause)
            pause = min(pause * 2, 2.0)
            async with self.lock_of(d):
                if not await self._settle(d):
                    return
