"""The agent on an event loop of its own, in a dedicated thread: what `procure serve` runs beside
the API. A tick makes synchronous store calls (SQLAlchemy) and waits on vendors; on the API's
loop it would stall every page, SSE stream and health check while it ran. Here the in-process
worker and every tick the API or the dashboard asks for run on the agent's loop instead, and the
API's handlers only await the answer.

    agent = AgentLoop(lambda: make_deps(settings, store), worker=WorkerConfig())
    await agent.start()                  # deps built on the agent's loop, worker started there
    result = await agent.tick(run_id, owner, lease_s)   # LeaseHeld / RunNotFound raise here
    balance = await agent.call(lambda deps: deps.ledger.balance(address))
    await agent.stop()                   # worker drained, deps closed, thread joined

The deps are built by `make_deps` *on the agent's loop* (their httpx clients belong to the loop
they are used on) and closed there on `stop` (pass `close=False` to keep deps you close yourself).
Anything that awaits a deps' client must go through `call`; plain attributes (`deps.store`,
`deps.account.address`) may be read from anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from procure.agent.deps import AgentDeps, TickResult
from procure.agent.runtime import close_deps
from procure.agent.worker import (
    Worker,
    WorkerConfig,
    WorkerLockHeld,
    sqlite_worker_lock,
    tick_under_lease,
)
from procure.loopthread import LoopNotRunning, LoopThread

log = logging.getLogger(__name__)
R = TypeVar("R")
THREAD_NAME = "procure-agent"
STOP_MARGIN_S = 10.0  # past the worker's own drain timeout, before its task is abandoned

__all__ = ["AgentLoop", "LoopNotRunning"]


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
