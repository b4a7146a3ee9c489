"""The worker: lease due runs, tick them concurrently (bounded), heartbeat, release, and back off
when there is nothing to do. Several workers may share one PostgreSQL store; on SQLite one worker
per database file (an advisory file lock enforces it: SQLite has a single writer anyway).

The loop is a continuous bounded pipeline, not a batch: up to `concurrency` ticks are in flight,
and as soon as a quarter of the slots are free it leases that many more due runs in one
statement (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and, in the same transaction, reads the state
of those that are polling a running job (three selects for the batch, `store.hotpath`).
Finished ticks are released in batches, in one transaction that also writes their plain polls'
progress (fenced by the leases), each tick's row in the tick log and the leases' release: on the
hot path a tick costs the store a few rows in batched statements, not statements of its own.
One heartbeat task renews all the worker's leases in one UPDATE; a tick whose lease was lost
(the worker stalled past the TTL and another took the run) is cancelled, which the tick
survives as it survives a crash. The tick log keeps `tick_log_days` of history and at most
`tick_log_per_run` rows per run, pruned in batches until the pass catches up (`upkeep.prune`).

`stop()` (SIGTERM/SIGINT in `procure worker`, shutdown in `procure serve`) stops leasing, lets
the ticks in flight finish (up to `drain_timeout_s`, then cancels them), and releases every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from sqlalchemy.orm import Session

from procure.agent import runlog
from procure.agent.deps import AgentDeps, RunNotFound
from procure.agent.leased_tick import retrieved
from procure.agent.tick import polling, tick
from procure.agent.upkeep import prune, settle_and_prune, sweep_clouds
from procure.models import RunState, Vendor, utcnow
from procure.store import Store, hotpath, leases

log = logging.getLogger(__name__)
# Called with (outcome, seconds) after each tick the worker makes: the API's metrics count them.
TICK_OBSERVERS: list[Callable[[str, float], None]] = []


def _env_float(name: str, default: float, lo: float, hi: float) -> float:
    """A number setting from the environment or `.env`; anything but a finite number in
    [lo, hi] is refused with a warning (a negative retention would prune the whole log)."""
    value = os.environ.get(name) or dotenv_values(".env").get(name) or ""
    try:
        number = float(value) if value.strip() else default
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and lo <= number <= hi):
        log.warning("%s=%r is not a number from %g to %g; using %s", name, value, lo, hi, default)
        return default
    return number


def _default_owner() -> str:
    return f"worker-{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerConfig:
    concurrency: int = 16
    lease_s: float = 60.0
    heartbeat_s: float = 15.0
    poll_interval_s: float = 1.0  # how soon a run is due again after a tick
    error_backoff_s: float = 5.0  # ... and after a tick that raised
    idle_min_s: float = 0.05
    idle_max_s: float = 2.0
    drain_timeout_s: float = 30.0
    settle_every_s: float = 30.0  # how often to settle payments left in doubt on ended runs
    flush_after_s: float = 0.02  # longest a finished tick waits for its batch to be released
    # Retention of the tick log (runs, jobs, payments, observations are never pruned): rows
    # older than `tick_log_days`, and beyond the newest `tick_log_per_run` of a run, go, in
    # batches of `prune_batch` rows, repeated each pass until caught up or `prune_budget_s`.
    tick_log_days: float = field(
        default_factory=lambda: _env_float("PROCURE_TICK_LOG_DAYS", 7.0, 0.01, 3650.0)
    )
    tick_log_per_run: int = field(
        default_factory=lambda: int(_env_float("PROCURE_TICK_LOG_PER_RUN", 1000, 1, 10_000_000))
    )
    prune_batch: int = 5000
    prune_budget_s: float = 10.0
    max_ticks: int | None = None  # stop after this many ticks (tests, benchmarks)
    once: bool = False  # lease one batch, tick it, and stop
    owner: str = field(default_factory=_default_owner)


ONCE_LEASE_TRIES = 5  # `--once`: leasing attempts that may raise before it gives up


@dataclass
class WorkerStats:
    ticks: int = 0
    errors: int = 0
    lost_leases: int = 0


class Worker:
    def __init__(self, deps: AgentDeps, cfg: WorkerConfig | None = None) -> None:
        self.deps = deps
        self.cfg = cfg or WorkerConfig()
        self.stats = WorkerStats()
        self._inflight: dict[asyncio.Task[None], str] = {}
        # When each tick's lease was last known held (monotonic): taken or renewed since then.
        self._held_at: dict[asyncio.Task[None], float] = {}
        self._done: list[tuple[leases.TickRecord, list[hotpath.PollWrite]]] = []
        self._done_since = 0.0  # when the oldest unreleased finished tick finished
        self._flushing: asyncio.Task[None] | None = None  # the batch being released
        self._releasing: list[tuple[leases.TickRecord, list[hotpath.PollWrite]]] = []  # its ticks
        self._stopping = asyncio.Event()
        self._started = 0
        self._lease_failures = 0  # leasing attempts in a row that raised (`_acquire`)
        self._trim_mark: int | None = None  # tick log id up to which runs were trimmed

    @property
    def store(self) -> Store:
        return self.deps.store

    def stop(self) -> None:
        """Graceful: stop leasing, finish the ticks in flight, release, return from `run`."""
        self._stopping.set()

    def abort(self) -> None:
        """Hard: cancel the ticks in flight too (they survive it as they survive a crash)."""
        self._stopping.set()
        for task in self._inflight:
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _room(self) -> int:
        room = self.cfg.concurrency - len(self._inflight)
        if self.cfg.max_ticks is not None:
            room = min(room, self.cfg.max_ticks - self._started)
        return max(room, 0)

    def _exhausted(self) -> bool:
        return self.cfg.max_ticks is not None and self._started >= self.cfg.max_ticks

    async def _tick(self, run_id: str, loaded: tuple[RunState, Vendor] | None) -> None:
        started = utcnow()
        outcome, next_in = "Tick error", self.cfg.error_backoff_s
        writes: list[hotpath.PollWrite] = []
        try:
            result = await tick(self.deps, run_id, loaded=loaded, sink=writes)
            outcome, next_in = result.message, self.cfg.poll_interval_s
            runlog.ticked(run_id, result)  # one line per run event
        except RunNotFound:
            outcome, next_in = "Run not found", None
        except asyncio.CancelledError:
            outcome, next_in = "Cancelled", self.cfg.poll_interval_s
            raise
        except Exception as exc:  # one run's trouble must not stop the others
            log.exception("tick of run %s failed", run_id)
            outcome = f"Tick error: {type(exc).__name__}"
            self.stats.errors += 1
        finally:
            self.stats.ticks += 1
            seconds = (utcnow() - started).total_seconds()
            for observe in TICK_OBSERVERS:  # metrics; never let them stop a tick's release
                with contextlib.suppress(Exception):
                    observe(outcome, seconds)
            if not self._done:
                self._done_since = time.monotonic()
            record = leases.TickRecord(run_id, self.cfg.owner, started, utcnow(), outcome, next_in)
            self._done.append((record, writes))

    def _lease(
        self, limit: int, mine: set[str]
    ) -> tuple[list[str], dict[str, tuple[RunState, Vendor]]]:
        with self.store.session() as s:
            run_ids = leases.acquire_due(s, self.cfg.owner, self.cfg.lease_s, limit, mine)
            return run_ids, _load_polling(s, run_ids)

    def _unreleased(self) -> set[str]:
        """The runs this worker ticks or has not yet released: never leased again before their
        release (whose fence is the owner, the same for a new lease of ours)."""
        return (
            set(self._inflight.values())
            | {r.run_id for r, _ in self._done}
            | {r.run_id for r, _ in self._releasing}
        )

    async def _acquire(self, limit: int) -> int:
        # In a thread: the ticks in flight go on while the statement and its commit wait.
        asked = time.monotonic()  # the leases run from no earlier than this
        try:
            run_ids, loaded = await asyncio.to_thread(self._lease, limit, self._unreleased())
        except Exception:
            self._lease_failures += 1
            log.exception("leasing due runs failed; backing off")
            return 0
        self._lease_failures = 0
        for run_id in run_ids:
            task = asyncio.create_task(
                self._tick(run_id, loaded.get(run_id)), name=f"tick-{run_id}"
            )
            self._inflight[task] = run_id
            self._held_at[task] = asked
        self._started += len(run_ids)
        return len(run_ids)

    def _flush_due(self, batch: int) -> bool:
        return bool(self._done) and (
            len(self._done) >= batch
            or not self._inflight
            or time.monotonic() >= self._done_since + self.cfg.flush_after_s
        )

    def _release(self, done: list[tuple[leases.TickRecord, list[hotpath.PollWrite]]]) -> None:
        """Release finished ticks' leases, with their plain polls' writes and their rows in the
        tick log, in one transaction. A write whose lease was lost is dropped."""
        with self.store.session() as s:
            writes = [(r.run_id, w) for r, ws in done for w in ws]
            held = hotpath.held_leases(s, self.cfg.owner, {run for run, _ in writes})
            hotpath.apply_polls(s, [w for run, w in writes if run in held])
            leases.finish(s, [r for r, _ in done])

    def _flush(self) -> None:
        """Release what has finished, now (shutdown)."""
        if not self._done:
            return
        done, self._done = self._done, []
        try:
            self._release(done)
        except Exception:
            log.exception("releasing %d leases failed; retrying", len(done))
            self._done[:0] = done

    def _flush_soon(self) -> None:
        """Release what has finished in a thread, one batch at a time: the ticks in flight go
        on while the batch's statements and commit wait on the store."""
        if not self._done or (self._flushing is not None and not self._flushing.done()):
            return
        done, self._done = self._done, []
        self._releasing = done

        async def release() -> None:
            try:
                await asyncio.to_thread(self._release, done)
            except Exception:
                log.exception("releasing %d leases failed; retrying", len(done))
                if not self._done:
                    self._done_since = time.monotonic()
                self._done[:0] = done
            finally:
                self._releasing = []

        self._flushing = asyncio.create_task(release(), name="release-batch")

    async def _flushed(self) -> None:
        """Wait for the batch being released, then release the rest."""
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        self._flush()

    async def _heartbeat(self) -> None:
        renewing: asyncio.Future[set[str]] | None = None  # a renewal the store has not answered
        renewing_at, counted = 0.0, True  # when it was asked; whether its answer was used
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            for task in [t for t in self._held_at if t not in self._inflight]:
                del self._held_at[task]
            running = dict(self._inflight)
            if renewing is not None and renewing.done() and not counted:
                # Answered after its beat (a store slow, not gone: SQLite's write lock under
                # load): the leases it renewed run from when it was asked.
                counted = True
                late = _outcome(renewing)
                for task, run_id in running.items():
                    if late is not None and run_id in late:
                        self._held_at[task] = max(self._held_at.get(task, 0.0), renewing_at)
            if not running:
                continue
            asked = time.monotonic()
            held: set[str] | None = None
            if renewing is not None and not renewing.done():
                log.error("heartbeat: the store has not answered the last renewal yet")
            else:
                renewing = asyncio.ensure_future(
                    asyncio.to_thread(self._renew, list(running.values()))
                )
                renewing.add_done_callback(retrieved)
                renewing_at, counted = asked, False
                try:
                    # No longer than a beat: a connection that hangs (a partition, a server
                    # gone without a word) gives no error for minutes, and the ticks must stop
                    # before their leases lapse, as when renewals fail.
                    held = await asyncio.wait_for(asyncio.shield(renewing), self.cfg.heartbeat_s)
                    counted = True
                except TimeoutError:
                    log.error("heartbeat: the store did not answer in %.1f s", self.cfg.heartbeat_s)
                except Exception:
                    counted = True
                    log.exception("heartbeat failed")
            for task, run_id in running.items():
                if task.done():
                    continue
                if held is not None and run_id in held:
                    self._held_at[task] = asked
                    continue
                # Lost, or not renewed for so long that it may lapse before the next beat
                # (the store unreachable): another worker may tick the run, so this one stops.
                since = self._held_at.get(task, asked)
                if held is not None or asked - since + self.cfg.heartbeat_s >= self.cfg.lease_s:
                    log.error("lost the lease on run %s; cancelling its tick", run_id)
                    self.stats.lost_leases += 1
                    task.cancel()

    def _renew(self, run_ids: list[str]) -> set[str]:
        with self.store.session() as s:
            return leases.renew_many(s, run_ids, self.cfg.owner, self.cfg.lease_s)

    def _prune(self) -> int:
        """One retention pass (see `prune`); the trim's mark is kept between passes."""
        deleted, self._trim_mark = prune(self.store, self.cfg, self._trim_mark)
        return deleted

    async def _wait(self, timeout: float | None) -> None:
        """Until a tick finishes, `stop()` is called, or `timeout` passes."""
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait(
                [*self._inflight, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
        for task in [t for t in self._inflight if t.done()]:
            del self._inflight[task]
            if not task.cancelled() and task.exception() is not None:  # not expected
                log.error("tick task failed", exc_info=task.exception())

    async def run(self) -> WorkerStats:
        """Tick due runs until `stop()`, `max_ticks` or (`once`) the first batch is done."""
        cfg = self.cfg
        batch_min = max(1, cfg.concurrency // 4)
        idle = cfg.idle_min_s
        next_poll = 0.0  # monotonic time before which a dry queue is not asked again
        log.info("worker %s started (concurrency %d)", cfg.owner, cfg.concurrency)
        heartbeat = asyncio.create_task(self._heartbeat())
        # Upkeep beside the ticks (`upkeep`): payments in doubt on ended runs, the tick log's
        # retention, and cloud instances no live run owns.
        settler = asyncio.create_task(settle_and_prune(self.deps, cfg.settle_every_s, self._prune))
        sweeper = asyncio.create_task(sweep_clouds(self.deps))
        try:
            while not self._stopping.is_set():
                if self._flush_due(batch_min):
                    self._flush_soon()
                if self._exhausted():
                    break
                room = self._room()
                now = time.monotonic()
                got = 0
                asked = room > 0 and (room >= batch_min or not self._inflight or now >= next_poll)
                if asked:
                    got = await self._acquire(room)
                    if got < room:  # the queue ran dry: ask again after a (growing) pause
                        next_poll = now + idle
                        idle = cfg.idle_min_s if got else min(cfg.idle_max_s, idle * 2)
                    else:
                        idle, next_poll = cfg.idle_min_s, 0.0
                    # Once: after the first pass that could ask the store. One whose leasing
                    # raised (a store busy or restarting) is asked again after its pause, up to
                    # ONCE_LEASE_TRIES, not ended having done nothing as if nothing were due.
                    if cfg.once and 0 < self._lease_failures < ONCE_LEASE_TRIES:
                        await self._wait(idle)
                        continue
                    if cfg.once:
                        self._stopping.set()
                        break
                if self._inflight:
                    waiting_for_runs = room - got > 0 and next_poll > now
                    timeout = max(0.0, next_poll - now) if waiting_for_runs else None
                    if self._done:  # a batch waits to be released
                        flush_in = max(0.0, self._done_since + cfg.flush_after_s - now)
                        timeout = flush_in if timeout is None else min(timeout, flush_in)
                    await self._wait(timeout)
                elif not asked or got == 0:
                    await self._wait(max(0.0, next_poll - time.monotonic()) or idle)
            await self._drain()
            await self._flushed()
        finally:
            heartbeat.cancel()
            settler.cancel()
            sweeper.cancel()
            for task in self._inflight:  # only left if we were cancelled ourselves
                task.cancel()
            self._flush()  # what the batch in flight (if any) does not hold
        log.info("worker %s stopped after %d ticks", cfg.owner, self.stats.ticks)
        return self.stats

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while self._inflight:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("cancelling %d ticks still in flight", len(self._inflight))
                for task in self._inflight:
                    task.cancel()
                await asyncio.gather(*self._inflight, return_exceptions=True)
                self._inflight.clear()
                break
            await asyncio.wait(list(self._inflight), timeout=left)
            for task in [t for t in self._inflight if t.done()]:
                del self._inflight[task]
            await self._flushed()


def _load_polling(s: Session, run_ids: list[str]) -> dict[str, tuple[RunState, Vendor]]:
    """The leased runs whose tick is a poll, with their job's vendor (read in the lease's
    transaction); the others are read by their own tick."""
    try:
        states = hotpath.load_tick_states(s, run_ids)
    except ValueError:  # a row the model refuses: read the runs one by one (below)
        states = _readable_states(s, run_ids)
    jobs = {run_id: job for run_id, state in states.items() if (job := polling(state))}
    try:
        vendors = hotpath.load_vendors(s, {job.vendor_id for job in jobs.values()})
    except ValueError:  # an unreadable vendor: its runs' own ticks read (and fail on) it
        vendors = {}
    return {
        run_id: (states[run_id], vendors[job.vendor_id])
        for run_id, job in jobs.items()
        if job.vendor_id in vendors
    }


def _readable_states(s: Session, run_ids: list[str]) -> dict[str, RunState]:
    """`load_tick_states` run by run, leaving out the runs whose rows the model refuses: one
    such run must not fail the batch's read, which would roll its leases back and lease the
    same batch again for ever (no run ticked). Left out, it is ticked unloaded, reads its own
    state, fails alone and backs off."""
    states: dict[str, RunState] = {}
    for run_id in run_ids:
        try:
            states.update(hotpath.load_tick_states(s, [run_id]))
        except ValueError:
            log.warning("run %s: its stored state cannot be read; ticked on its own", run_id)
    return states


async def run_worker(deps: AgentDeps, cfg: WorkerConfig | None = None) -> WorkerStats:
    return await Worker(deps, cfg).run()


# --- one worker per SQLite file ------------------------------------------------------------


class WorkerLockHeld(RuntimeError):
    pass


@contextlib.contextmanager
def sqlite_worker_lock(store: Store) -> Iterator[None]:
    """On SQLite, hold an advisory lock on `<db>.worker.lock` so that only one worker runs per
    database file (single-writer discipline); a no-op on PostgreSQL and in-memory SQLite."""
    database = store.engine.url.database
    if not store.is_sqlite or not database or database == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(database).with_name(Path(database).name + ".worker.lock")
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkerLockHeld(
                f"another worker already runs on the SQLite store {database}; "
                "one worker per SQLite file (use PostgreSQL for several)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _outcome(future: asyncio.Future[set[str]]) -> set[str] | None:
    """A finished renewal's leases still held, or None where it failed or was cancelled."""
    if future.cancelled() or future.exception() is not None:
        return None
    return future.result()
