"""A uvicorn server that stops at once when asked (uvicorn's own notices at its loop's next
0.1 s tick): the local services, mock nodes and tests start and stop many."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn
from starlette.types import ASGIApp

GRACE_S = 5  # a connection still open (a dashboard's event stream) holds a stop no longer


class Server(uvicorn.Server):
    """uvicorn's server; `exit()` ends its main loop at once (from any thread)."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._wake, self._loop = asyncio.Event(), asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864_000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def exit(self) -> None:
        self.should_exit = True
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has already closed
                self._loop.call_soon_threadsafe(self._wake.set)


def local_server(app: ASGIApp, host: str, port: int) -> Server:
    """The server for `app` on `host:port` as every local service runs one: quiet, with its
    lifespan, and the quick stop and the grace above."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=GRACE_S,
    )
    return Server(config)
