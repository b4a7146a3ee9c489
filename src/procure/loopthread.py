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

`AgentLoop` is that thread for the agent: its deps built on the thread's loop, the in-process
worker run there, and every tick the API or the dashboard asks for run there too:

    agent = AgentLoop(lambda: make_deps(settings, store), worker=WorkerConfig())
    await agent.start()                  # deps built on the agent's loop, worker started there
    result = await agent.tick(run_id, owner, lease_s)   # LeaseHeld / RunNotFound raise here
    balance = await agent.call(lambda deps: deps.ledger.balance(address))
    await agent.stop()                   # worker drained, deps closed, thread joined

Anything that awaits a deps' client must go through `call` (pass `close=False` to keep deps you
close yourself); plain attributes (`deps.store`, `deps.account.address`) may be read anywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from procure.agent.deps import AgentDeps, TickResult
from procure.agent.leased_tick import tick_under_lease
from procure.agent.runtime import close_deps
from procure.agent.worker import Worker, WorkerConfig, WorkerLockHeld, sqlite_worker_lock

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
THREAD_NAME = "procure-agent"
STOP_MARGIN_S = 10.0  # past the worker's own drain timeout, before its task is abandoned


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


class AgentLoop:
    def __init__(
        self,
        make_deps: Callable[[], AgentDeps],
        *,
        worker: WorkerConfig | None = None,
        close: bool = True,
        name: str = THREAD_NAME,
    ) -> None:
        self._make_deps = make_deps
        self._worker_cfg = worker
        self._close = close
        self.worker: Worker | None = None
        """The in-process worker, while it runs (None without one, or when another worker
        holds the SQLite store's worker lock)."""
        self._thread: LoopThread[AgentDeps] = LoopThread(self._running, name=name)

    @property
    def deps(self) -> AgentDeps:
        """The agent's deps (they live on the agent's loop: await their clients via `call`)."""
        return self._thread.value

    @property
    def running(self) -> bool:
        return self._thread.running

    @property
    def thread(self) -> threading.Thread | None:
        """The agent's thread (None before `start`)."""
        return self._thread.thread

    async def start(self) -> AgentDeps:
        """Build the deps and start the worker on the agent's loop; raises what building the
        deps raised."""
        return await self._thread.start()

    async def stop(self) -> None:
        """Stop the worker (the ticks in flight finish, up to its drain timeout), close the
        deps, end the thread."""
        await self._thread.stop()

    async def call(self, fn: Callable[[AgentDeps], Awaitable[R]]) -> R:
        """`await fn(deps)` on the agent's loop; its result or error comes back here."""
        return await self._thread.call(fn)

    async def tick(self, run_id: str, owner: str, lease_s: float) -> TickResult:
        """One tick of `run_id` under its lease (`tick_under_lease`) on the agent's loop:
        raises `LeaseHeld` while someone else ticks it, `RunNotFound` for an unknown run."""
        return await self.call(lambda deps: tick_under_lease(deps, run_id, owner, lease_s))

    async def __aenter__(self) -> AgentLoop:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[AgentDeps]:
        """On the agent's loop: the deps, and the worker if configured, for the loop's life."""
        deps = self._make_deps()
        try:
            if self._worker_cfg is None:
                yield deps
            else:
                async with self._working(deps, self._worker_cfg):
                    yield deps
        finally:
            if self._close:
                await close_deps(deps)

    @contextlib.asynccontextmanager
    async def _working(self, deps: AgentDeps, cfg: WorkerConfig) -> AsyncIterator[None]:
        """The in-process worker: started with the loop, drained and stopped when it stops."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(sqlite_worker_lock(deps.store))
            except WorkerLockHeld as exc:
                log.warning("not running a worker in this server: %s", exc)
                yield
                return
            worker = self.worker = Worker(deps, cfg)
            task = asyncio.create_task(worker.run(), name="procure-worker")
            try:
                yield
            finally:
                worker.stop()
                try:
                    await asyncio.wait_for(task, cfg.drain_timeout_s + STOP_MARGIN_S)
                except TimeoutError:
                    log.error("the in-process worker did not stop in time")
                except Exception:  # its loop ended on a bug: say so, and shut down anyway
                    log.exception("the in-process worker failed")
