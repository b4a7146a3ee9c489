"""One tick of one run outside the worker (the API, the CLI, the serverless cron): take the run's
lease or refuse, tick with a heartbeat, log the tick and release; the store's calls in threads."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from procure.agent import runlog
from procure.agent.deps import AgentDeps, RunNotFound, TickResult
from procure.agent.tick import tick
from procure.models import utcnow
from procure.store import Store, leases, repo

log = logging.getLogger(__name__)


class LeaseHeld(Exception):
    """Someone else is ticking the run."""

    def __init__(self, run_id: str, holder: str | None) -> None:
        super().__init__(f"run {run_id} is being ticked by {holder or 'another ticker'}")
        self.holder = holder


def retrieved(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned renewal's outcome (asyncio would warn of an unretrieved error)."""
    if not future.cancelled():
        future.exception()


async def tick_under_lease(
    deps: AgentDeps,
    run_id: str,
    owner: str,
    lease_s: float = 120.0,
    next_tick_in_s: float | None = None,
) -> TickResult:
    """One tick of one run outside the worker (API, CLI): take the run's lease or raise
    `LeaseHeld`, tick with a heartbeat, log the tick and release. `RunNotFound` if unknown.
    `next_tick_in_s`: make the run due again this soon (a scheduler's round: the run goes to
    the back of the queue, which is oldest due first); None leaves when it is due as it is.

    Its store calls run in threads: on a connection that hangs, a call made on the loop itself
    would stop every other tick the loop runs (the in-process worker's, other API calls')."""
    await asyncio.to_thread(_take_lease, deps.store, run_id, owner, lease_s)
    work = asyncio.ensure_future(tick(deps, run_id))

    def renew() -> bool:
        with deps.store.session() as s:
            return leases.renew(s, run_id, owner, lease_s)

    async def heartbeat() -> None:
        # Renew while the tick runs; if the lease was lost (this loop stalled past its TTL and
        # someone else took the run), or could not be renewed for so long that it may lapse
        # before the next try (the store unreachable, or not answering: a renewal is waited
        # for a beat at most), stop the tick: it survives that as it survives a crash.
        renewed = time.monotonic()
        renewing: asyncio.Future[bool] | None = None
        while True:
            await asyncio.sleep(lease_s / 3)
            asked = time.monotonic()
            held: bool | None = None
            if renewing is None or renewing.done():
                renewing = asyncio.ensure_future(asyncio.to_thread(renew))
                renewing.add_done_callback(retrieved)
                try:
                    held = await asyncio.wait_for(asyncio.shield(renewing), lease_s / 3)
                except TimeoutError:
                    log.error("renewing the lease on run %s: the store did not answer", run_id)
                except Exception:
                    log.exception("renewing the lease on run %s failed", run_id)
            if held:
                renewed = asked
                continue
            if held is False or asked - renewed + lease_s / 3 >= lease_s:
                log.error("lost the lease on run %s; cancelling the tick", run_id)
                work.cancel()
                return

    beat = asyncio.create_task(heartbeat())
    started = utcnow()
    outcome = "Tick error"
    try:
        result = await work
        outcome = result.message
        runlog.ticked(run_id, result)  # one line per run event, as the worker's ticks log
        return result
    except RunNotFound:
        outcome = "Run not found"
        raise
    except asyncio.CancelledError:
        if beat.done() and not beat.cancelled():  # the heartbeat lost the lease: stopped
            outcome = "Lease lost"
            holder = await asyncio.to_thread(_holder, deps.store, run_id)
            raise LeaseHeld(run_id, holder) from None
        work.cancel()  # we were cancelled ourselves: so is the tick
        outcome = "Cancelled"
        raise
    finally:
        beat.cancel()
        again = None if outcome == "Run not found" else next_tick_in_s
        record = leases.TickRecord(run_id, owner, started, utcnow(), outcome, again)
        # In a thread, shielded: the release is written even if we are cancelled meanwhile.
        await asyncio.shield(asyncio.to_thread(_finish, deps.store, record))


def _take_lease(store: Store, run_id: str, owner: str, lease_s: float) -> None:
    """Take the run's lease for `owner`, or raise `LeaseHeld` (`RunNotFound` if unknown)."""
    with store.session() as s:
        if not leases.acquire(s, run_id, owner, lease_s):
            held_by = leases.holder(s, run_id)
            if held_by is None and repo.get_run(s, run_id) is None:
                raise RunNotFound(run_id)
            raise LeaseHeld(run_id, held_by)


def _holder(store: Store, run_id: str) -> str | None:
    with store.session() as s:
        return leases.holder(s, run_id)


def _finish(store: Store, record: leases.TickRecord) -> None:
    with store.session() as s:
        leases.finish(s, [record])
