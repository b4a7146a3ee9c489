"""An asyncio event loop on a thread of its own, holding one async context manager open for its
lifetime: what `procure serve` runs beside the API's loop (the agent, the fleet controller), so
that their synchronous store calls never stall the API's pages, SSE streams or health checks.

    background = LoopThread(lambda: some_async_context_manager(), name="procure-agent")
    value = await background.start()      # entered on the thread's loop; its errors raise here
    answer = await background.call(lambda v: v.something_async())   # runs on the thread's loop
    await background.stop()               # leaves the context manager there, joins the thread

Everything the context manager builds (e.g. httpx clients, which belong to the loop they are
used on) is built, used and closed on the thread's loop: callers reach it only through `call`.
A caller cancelled while waiting in `call` cancels the coroutine it started there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class LoopNotRunning(RuntimeError):
    """`call` before `start` returned, or after `stop`."""


async def _waited(future: concurrent.futures.Future[R]) -> R:
    """Await a future the thread completes; a cancelled waiter leaves the future alone."""
    return await asyncio.shield(asyncio.wrap_future(future))


class LoopThread(Generic[T]):
    def __init__(self, setup: Callable[[], AbstractAsyncContextManager[T]], *, name: str) -> None:
        self._setup = setup
        self.name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._entered: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._value: T | None = None
        self._open = False
        self._stop_requested = False

    @property
    def value(self) -> T:
        """What the context manager yielded (once `start` has returned)."""
        if not self._open:
            raise LoopNotRunning(f"{self.name} is not running")
        return self._value  # type: ignore[return-value]

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def running(self) -> bool:
        return self._open

    async def start(self) -> T:
        """Start the thread, enter the context manager there, return what it yields (or raise
        what entering it raised, once the thread has ended)."""
        self._start_thread()
        try:
            self._value = await _waited(self._entered)
        except BaseException:
            self._signal_stop()  # if we were cancelled while it was entering
            await asyncio.to_thread(self._join)
            raise
        self._open = True
        return self._value

    def start_blocking(self, timeout: float | None = None) -> T:
        """`start` for synchronous callers (never from a running event loop)."""
        self._start_thread()
        try:
            self._value = self._entered.result(timeout)
        except BaseException:
            self._signal_stop()
            self._join()
            raise
        self._open = True
        return self._value

    def _start_thread(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} was already started")
        # Daemon: a forced exit (a second Ctrl+C) is never held up by it; `stop` joins it.
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            asyncio.run(self._hold())
        except BaseException as exc:  # reported to whoever waits on us
            if not self._entered.done():
                self._entered.set_exception(exc)
            self._finished.set_exception(exc)
        else:
            if not self._entered.done():  # cannot happen: `_hold` enters or raises
                self._entered.set_exception(LoopNotRunning(f"{self.name} ended"))
            self._finished.set_result(None)

    async def _hold(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with self._setup() as value:
            self._entered.set_result(value)
            if not self._stop_requested:
                await self._stopping.wait()

    async def call(self, fn: Callable[[T], Awaitable[R]]) -> R:
        """`await fn(value)` on the thread's loop, from any other loop; its result or error
        comes back here."""
        future = self._submit(fn)
        return await asyncio.wrap_future(future)

    def call_blocking(self, fn: Callable[[T], Awaitable[R]], timeout: float | None = None) -> R:
        """`call` for synchronous callers (never from the thread's own loop)."""
        return self._submit(fn).result(timeout)

    def _submit(self, fn: Callable[[T], Awaitable[R]]) -> concurrent.futures.Future[R]:
        loop = self._loop
        if not self._open or loop is None or loop.is_closed() or self._finished.done():
            raise LoopNotRunning(f"{self.name} is not running")

        async def run() -> R:
            return await fn(self._value)  # type: ignore[arg-type]

        coro = run()
        try:
            return asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError as exc:  # the loop closed in between
            coro.close()
            raise LoopNotRunning(f"{self.name} is not running") from exc

    def _signal_stop(self) -> bool:
        """Ask the thread to leave its context manager; False if it is not running."""
        self._open = False
        self._stop_requested = True
        loop, stopping = self._loop, self._stopping
        if self._thread is None or loop is None or stopping is None or self._finished.done():
            return False
        with contextlib.suppress(RuntimeError):  # closed meanwhile: it is ending anyway
            loop.call_soon_threadsafe(stopping.set)
        return True

    async def stop(self) -> None:
        """Leave the context manager on the thread's loop (it drains what it runs), end the
        thread and join it. Raises what leaving the context manager raised. Idempotent."""
        if self._thread is None or self._failed_to_enter():
            return
        self._signal_stop()
        try:
            await _waited(self._finished)
        finally:
            await asyncio.to_thread(self._join)

    def stop_blocking(self, timeout: float | None = None) -> None:
        """`stop` for synchronous callers."""
        if self._thread is None or self._failed_to_enter():
            return
        self._signal_stop()
        self._finished.result(timeout)
        self._join(timeout)

    def _failed_to_enter(self) -> bool:
        """Entering raised (and `start` said so): the thread has ended, nothing to stop."""
        return self._entered.done() and self._entered.exception() is not None

    def _join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s did not end in time", self.name)

    async def __aenter__(self) -> T:
        return await self.start()

    async def __aexit__(self, *_exc: Any) -> None:
        await self.stop()
