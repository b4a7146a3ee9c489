"""How runs are ticked concurrently, a second look: the worker's batches and its leases, and
the serverless cron's rounds, on SQLite and PostgreSQL. A run the store cannot read must not stop
the worker ticking the others; a run is never leased again by a worker that has not released its
last tick; a scheduled call's rounds reach every due run."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.engine import make_url

from procure.agent import leased_tick, worker
from procure.agent.deps import TickResult
from procure.agent.leased_tick import LeaseHeld, tick_under_lease
from procure.agent.worker import Worker, WorkerConfig
from procure.api.serverless import tick_due
from procure.models import JobSpec
from procure.settings import Settings
from procure.store import Store, leases, open_store, repo
from procure.store.tables import RunRow, TickLogRow

OUTAGE_S = 3.0  # how long a store stops answering (the scenario, not a wait for a condition)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


def _new_run(store: Store) -> str:
    with store.session() as s:
        return repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id


def test_a_run_the_store_cannot_read_does_not_stop_the_others_being_ticked(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the worker reads the state of every run it leases in one go, in the
    lease's transaction; one run whose row today's model refuses (a job spec an older version
    wrote, a row edited by hand) failed that read, rolled the leases back, and the worker leased
    the same batch again for ever: no run was ever ticked again."""
    bad = _new_run(store)
    good = _new_run(store)
    with store.session() as s:  # hours must be > 0 today: a spec the model refuses to load
        s.execute(update(RunRow).where(RunRow.id == bad).values(job_spec={"hours": -1}))
    ticked: list[str] = []

    async def fake_tick(_deps: object, run_id: str, **_kw: object) -> TickResult:
        ticked.append(run_id)
        return TickResult("ticked")

    monkeypatch.setattr(worker, "tick", fake_tick)
    deps = SimpleNamespace(store=store, clouds={})
    cfg = WorkerConfig(concurrency=4, once=True)
    asyncio.run(Worker(deps, cfg).run())  # type: ignore[arg-type]
    assert good in ticked, "the worker never ticked the healthy run beside the unreadable one"


def test_a_store_slow_to_renew_does_not_cost_the_worker_its_ticks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a renewal answered after its heartbeat's wait (a store slow, not gone:
    SQLite's write lock on a loaded machine) was thrown away, so every renewal counted as
    failed and the worker cancelled its own ticks, though their leases were held all along."""
    run_id = _new_run(store)
    real = leases.renew_many

    def slow_renew(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.45)  # one and a half beats, every time
        return real(*args, **kwargs)

    monkeypatch.setattr(leases, "renew_many", slow_renew)
    finished: list[str] = []

    async def long_tick(_deps: object, run_id: str, **_kw: object) -> TickResult:
        await asyncio.sleep(4.0)  # several leases long
        finished.append(run_id)
        return TickResult("ticked")

    monkeypatch.setattr(worker, "tick", long_tick)
    deps = SimpleNamespace(store=store, clouds={})
    cfg = WorkerConfig(concurrency=1, once=True, lease_s=1.5, heartbeat_s=0.3)
    stats = asyncio.run(Worker(deps, cfg).run())  # type: ignore[arg-type]
    assert finished == [run_id], "the worker cancelled its own tick while it held the lease"
    assert stats.lost_leases == 0


def _lock_tick_log(db_url: str) -> tuple[Any, Any]:
    """Hold a lock that holds up writes to the tick log (a long report, a backup, vacuum) but
    not the leasing of runs; returns (engine, transaction) to commit when done."""
    engine = create_engine(db_url)
    conn = engine.connect()
    held = conn.begin()
    conn.execute(text("LOCK TABLE tick_log IN SHARE ROW EXCLUSIVE MODE"))
    return engine, held


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_worker_does_not_lease_a_run_again_before_its_last_tick_is_released(
    db_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: when a finished tick's release was held up past its lease, the worker
    leased the run again (under the same owner) and ticked it; the late release then cleared
    that new lease, so another worker took the run while the second tick still ran."""
    run_id = _new_run(store)
    seen: dict[str, Any] = {}
    ticks = 0
    second = threading.Event()

    real_acquire_due = leases.acquire_due
    asks = [0]  # the worker's asks for due runs, counted as each begins

    def counted_acquire_due(*args: Any, **kwargs: Any) -> Any:
        asks[0] += 1
        return real_acquire_due(*args, **kwargs)

    monkeypatch.setattr(leases, "acquire_due", counted_acquire_due)

    def unlock_later(lock: tuple[Any, Any]) -> None:
        # Until the first tick's lease has lapsed (its release held up), and then until the
        # worker has asked for due runs three times since: before the fix, its first ask
        # leased the run again and ticked it at once (the wait ends then too).
        deadline = time.monotonic() + 30
        while not second.is_set() and _held(store, run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        lapsed = asks[0]
        deadline = time.monotonic() + 5
        while not second.is_set() and asks[0] < lapsed + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        engine, held = lock
        held.commit()
        engine.dispose()

    async def fake_tick(_deps: object, _run_id: str, **_kw: object) -> TickResult:
        nonlocal ticks
        ticks += 1
        if ticks == 1:  # the tick ends while the tick log is locked: its release waits
            lock = await asyncio.to_thread(_lock_tick_log, db_url)
            threading.Thread(target=unlock_later, args=(lock,), daemon=True).start()
            return TickResult("ticked")
        second.set()
        # Meanwhile worker-b tries to lease the run until the first tick's release is written
        # (before the fix it came now, late, and cleared this tick's lease), and once after.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            released = _logged(store, run_id)
            with store.session() as s:
                if leases.acquire(s, run_id, "worker-b", 60):
                    seen["overlap"] = True
                    break
            if released:
                break
            await asyncio.sleep(0.05)
        return TickResult("ticked")

    monkeypatch.setattr(worker, "tick", fake_tick)
    deps = SimpleNamespace(store=store, clouds={})
    cfg = WorkerConfig(
        concurrency=4, lease_s=4, heartbeat_s=0.5, poll_interval_s=0, idle_max_s=0.2, max_ticks=2
    )
    asyncio.run(asyncio.wait_for(Worker(deps, cfg).run(), 120))  # type: ignore[arg-type]
    assert ticks == 2
    assert not seen.get("overlap"), "worker-b leased the run while the worker's second tick ran"


def _held(store: Store, *run_ids: str) -> bool:
    with store.session() as s:
        return any(leases.holder(s, run_id) is not None for run_id in run_ids)


def _logged(store: Store, run_id: str) -> bool:
    """Whether a tick of the run is in the tick log: its release, written in one transaction
    with the log's row, is done."""
    with store.session() as s:
        logged = select(func.count()).select_from(TickLogRow).where(TickLogRow.run_id == run_id)
        return bool(s.scalar(logged))


def test_a_scheduled_tick_reaches_every_due_run_not_only_the_oldest_batch(
    db_url: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a tick under a lease outside the worker (the serverless cron's) released
    the run without making it due later, so its place in the queue (oldest due first) never
    moved: each round of `GET /api/cron/tick`, and each call, ticked the same oldest batch again
    and again, and a run beyond it was never ticked while those ran."""
    runs = [_new_run(store) for _ in range(3)]
    ticked: list[str] = []

    async def fake_tick(_deps: object, run_id: str, **_kw: object) -> TickResult:
        ticked.append(run_id)
        return TickResult("Job running (10%)")

    monkeypatch.setattr(leased_tick, "tick", fake_tick)
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    # Rounds of two runs, for a while: plenty of rounds to reach the third run.
    asyncio.run(tick_due(settings, store, budget_s=4.0, batch=2, pause_s=0.05))
    assert len(ticked) >= 6, ticked
    assert runs[2] in ticked, "the scheduled call ticked the two oldest runs, round after round"


def test_a_scheduled_call_cuts_a_round_that_outruns_its_budget_and_frees_the_run(
    db_url: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a scheduled call waited for the slowest tick of its last round, however
    far past its budget (45 s, under the platform's 60 s limit): the platform then killed it
    mid-tick, leaving the run's lease to lapse. Now a round still running at the budget's end
    is cancelled (a tick survives that as a crash), its lease released and the call answers."""
    run_id = _new_run(store)
    started = threading.Event()

    async def endless_tick(_deps: object, run_id: str, **_kw: object) -> TickResult:
        started.set()
        await asyncio.sleep(3600)  # a vendor that never answers, say
        return TickResult("never")

    monkeypatch.setattr(leased_tick, "tick", endless_tick)
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    answer: list[dict[str, Any]] = []
    caller = threading.Thread(
        target=lambda: answer.append(asyncio.run(tick_due(settings, store, budget_s=1.0))),
        daemon=True,
    )
    caller.start()
    caller.join(120)
    assert started.is_set()
    assert answer, "the scheduled call was still waiting for its tick 2 minutes on"
    assert answer[0]["cut"] == 1 and answer[0]["ticked"] == 0
    with store.session() as s:
        assert leases.holder(s, run_id) is None, "the cut tick's lease was left to lapse"


class FreezingProxy:
    """A TCP relay on loopback to the PostgreSQL server that can freeze: it then holds what
    either side sends, connections open, as a network partition or a half-open connection to a
    failed-over server does (no error, no answer)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.thaw()
        self.listener.close()


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_worker_whose_store_stops_answering_stops_its_ticks_before_their_leases_lapse(
    db_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the worker's heartbeat waited on its renewal for as long as the store
    took to answer; on a connection that hangs (a partition, a failed-over server: no error
    for many minutes) its ticks ran on past their leases, and another worker, reaching the
    store, ticked the same runs at the same time."""
    run_id = _new_run(store)
    url = make_url(db_url)
    proxy = FreezingProxy(url.host or "127.0.0.1", url.port or 5432)
    hung = open_store(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
    seen: dict[str, Any] = {}

    async def slow_tick(_deps: object, _run_id: str, **_kw: object) -> TickResult:
        proxy.freeze()  # the worker's store stops answering; worker-b still reaches it
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                with store.session() as s:
                    if leases.acquire(s, run_id, "worker-b", 60):
                        seen["overlap"] = True  # two tickers on one run, at once
                        return TickResult("ticked on beside worker-b")
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            seen["stopped"] = True
            raise
        finally:
            proxy.thaw()  # so that the worker can give back what it holds
        return TickResult("ticked alone")

    monkeypatch.setattr(worker, "tick", slow_tick)
    deps = SimpleNamespace(store=hung, clouds={})
    cfg = WorkerConfig(concurrency=1, lease_s=2, heartbeat_s=0.4, once=True, drain_timeout_s=60)
    try:
        asyncio.run(asyncio.wait_for(Worker(deps, cfg).run(), 120))  # type: ignore[arg-type]
    finally:
        proxy.close()
        hung.dispose()
    assert not seen.get("overlap"), "worker-b leased the run while the first tick still ran"
    assert seen.get("stopped"), "the tick was never stopped"


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_an_api_tick_whose_store_stops_answering_does_not_freeze_the_other_ticks(
    db_url: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a tick through the API (or the serverless cron) renewed its lease with a
    store call made on the agent's event loop itself; on a connection that hangs, that call held
    the whole loop, so every other tick on it (the in-process worker's, other API calls') stood
    still until the connection gave up, minutes later."""
    run_id = _new_run(store)
    url = make_url(db_url)
    proxy = FreezingProxy(url.host or "127.0.0.1", url.port or 5432)
    hung = open_store(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
    frozen = threading.Event()
    beats_while_frozen = 0

    async def slow_tick(_deps: object, _run_id: str, **_kw: object) -> TickResult:
        proxy.freeze()  # the store stops answering this process, for a while
        frozen.set()
        threading.Timer(OUTAGE_S, proxy.thaw).start()
        await asyncio.sleep(OUTAGE_S + 1)
        return TickResult("ticked")

    async def other_ticks() -> None:  # the rest of the loop's work, e.g. the worker's ticks
        nonlocal beats_while_frozen
        while True:
            await asyncio.sleep(0.05)
            if frozen.is_set() and not proxy.flowing.is_set():
                beats_while_frozen += 1

    async def both() -> None:
        others = asyncio.create_task(other_ticks())
        try:
            with contextlib.suppress(LeaseHeld):
                await tick_under_lease(deps, run_id, "api-a", lease_s=0.6)  # type: ignore[arg-type]
        finally:
            others.cancel()

    monkeypatch.setattr(leased_tick, "tick", slow_tick)
    deps = SimpleNamespace(store=hung, clouds={})
    try:
        asyncio.run(asyncio.wait_for(both(), 120))
    finally:
        proxy.close()
        hung.dispose()
    # The outage lasts OUTAGE_S; a loop that runs on counts a beat every 50 ms of it.
    assert beats_while_frozen >= 10, f"the loop stood still: {beats_while_frozen} beats"


def test_an_api_tick_that_waited_for_the_sqlite_write_lock_holds_a_live_lease(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: on SQLite a lease's expiry was computed before the statement waited for
    the write lock; an API tick that waited longer than its lease (another writer's long
    transaction) took a lease that had already lapsed, and a worker ticked the run beside it."""
    store = open_store(sqlite_url)
    run_id = _new_run(store)
    seen: dict[str, Any] = {}

    async def fake_tick(_deps: object, _run_id: str, **_kw: object) -> TickResult:
        with store.session() as s:  # a worker looks for the run as the API tick starts
            seen["overlap"] = leases.acquire(s, run_id, "worker-b", 60)
        return TickResult("ticked")

    monkeypatch.setattr(leased_tick, "tick", fake_tick)
    # Another writer holds SQLite's write lock for longer than the API tick's lease.
    blocker = sqlite3.connect(make_url(sqlite_url).database or "", check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    threading.Timer(2.0, blocker.commit).start()
    deps = SimpleNamespace(store=store, clouds={})
    try:
        asyncio.run(tick_under_lease(deps, run_id, "api-a", lease_s=1.0))  # type: ignore[arg-type]
    finally:
        blocker.close()
        store.dispose()
    assert seen.get("overlap") is False, "worker-b leased the run while the API tick ran"
