"""Client-side pacing for Vast.ai's rate limits: a minimum interval between calls per endpoint
(what Vast enforces, per key and address), and a growing back-off after a 429, which from Vast
carries no Retry-After. The clock and sleep are injected so tests need not wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# Seconds between calls, from the spec's example 429s (threshold=X; that X is seconds is
# UNVERIFIED). Search and charges give none: one a second is our guess.
INTERVALS_S: dict[str, float] = {
    "search": 1.0,
    "create": 4.5,
    "list": 1.0,
    "show": 2.0,
    "destroy": 3.0,
    "charges": 1.0,
}
MAX_BACKOFF_S = 60.0


class Pacer:
    """Spaces calls per endpoint; after a 429 the endpoint waits a back-off that doubles with
    each 429 in a row (from the interval Vast's message names, or ours)."""

    def __init__(
        self,
        scale: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.intervals = {k: v * scale for k, v in INTERVALS_S.items()}
        self._clock = clock
        self._sleep = sleep
        self._next: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.waited_s = 0.0

    async def wait(self, endpoint: str) -> None:
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            due = self._next.get(endpoint)
            wait = due - self._clock() if due is not None else 0.0
            if wait > 0:
                self.waited_s += wait
                await self._sleep(wait)
            self._next[endpoint] = self._clock() + self.intervals.get(endpoint, 1.0)

    def ok(self, endpoint: str) -> None:
        self._strikes.pop(endpoint, None)

    def limited(self, endpoint: str, threshold_s: float | None) -> float:
        """Record a 429; the back-off (seconds) before this endpoint is called again."""
        strikes = self._strikes.get(endpoint, 0) + 1
        self._strikes[endpoint] = strikes
        base = max(threshold_s or 0.0, self.intervals.get(endpoint, 1.0), 0.15)
        backoff = min(base * 2 ** (strikes - 1), MAX_BACKOFF_S)
        self._next[endpoint] = max(self._next.get(endpoint, 0.0), self._clock() + backoff)
        return backoff
