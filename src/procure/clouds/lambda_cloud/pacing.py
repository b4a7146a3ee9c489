"""Client-side pacing for Lambda's rate limits (about 1 request/s, launch 1 per 12 s; its API has
no 429 to lean on). Clock and sleep are injected, so tests measure pacing without waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

REQUEST_INTERVAL_S = 1.0
LAUNCH_INTERVAL_S = 12.0
MAX_PAUSE_S = 60.0  # a 429 holds this client's calls, a terminate among them, a minute at most


class Pacer:
    """Spaces calls: every call at least `request_interval_s` after the previous one, a launch at
    least `launch_interval_s` after the previous launch. Calls wait their turn in order."""

    def __init__(
        self,
        request_interval_s: float = REQUEST_INTERVAL_S,
        launch_interval_s: float = LAUNCH_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.request_interval_s = request_interval_s
        self.launch_interval_s = launch_interval_s
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._next_request: float | None = None
        self._next_launch: float | None = None
        self.waited_s = 0.0

    def pause(self, seconds: float) -> None:
        """No call before `seconds` from now (what a 429's Retry-After asks)."""
        until = self._clock() + min(max(seconds, 0.0), MAX_PAUSE_S)
        self._next_request = until if self._next_request is None else max(self._next_request, until)

    async def wait(self, *, launch: bool = False) -> None:
        async with self._lock:
            due = [self._next_request]
            if launch:
                due.append(self._next_launch)
            wait = max((d - self._clock() for d in due if d is not None), default=0.0)
            if wait > 0:
                self.waited_s += wait
                await self._sleep(wait)
            now = self._clock()
            self._next_request = now + self.request_interval_s
            if launch:
                self._next_launch = now + self.launch_interval_s


def unpaced() -> Pacer:
    """No pacing (a mock cloud that runs faster than real time, tests)."""
    return Pacer(0.0, 0.0)
