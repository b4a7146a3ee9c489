"""Client-side pacing for RunPod's rate limits: an optional minimum spacing between calls, and a
pause until the time a 429's `Retry-After` (or an exhausted `RateLimit` window) names. Clock and
sleep are injected, so tests see the waits without waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

MAX_PAUSE_S = 300.0  # a provider's absurd Retry-After must not park the client for hours


class Pacer:
    def __init__(
        self,
        interval_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._next: float | None = None
        self.waited_s = 0.0

    def pause(self, seconds: float) -> None:
        """No call before `seconds` from now (what a 429's Retry-After asks)."""
        until = self._clock() + min(max(seconds, 0.0), MAX_PAUSE_S)
        self._next = until if self._next is None else max(self._next, until)

    async def wait(self) -> None:
        async with self._lock:
            if self._next is not None:
                wait = self._next - self._clock()
                if wait > 0:
                    self.waited_s += wait
                    await self._sleep(wait)
            self._next = self._clock() + self.interval_s
