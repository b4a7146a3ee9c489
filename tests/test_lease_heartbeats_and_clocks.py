"""A run's lease holds while its tick runs, and only then (invariant 4): a tick whose heartbeats
fail stops before its lease can lapse, in the worker and outside it, and on PostgreSQL leases run
on the store's clock, so a process whose own clock runs ahead cannot take a live one."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from procure.agent import leased_tick, worker
from procure.agent.deps import TickResult
from procure.agent.leased_tick import LeaseHeld, tick_under_lease
from procure.agent.worker import Worker, WorkerConfig
from procure.models import JobSpec, utcnow
from procure.store import Store, leases, open_store, repo


def _store_with_run(tmp_path: Path) -> tuple[Store, str]:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id
    return store, run_id


def _rival_tick(store: Store, run_id: str, seen: dict[str, Any], limit_s: float) -> Any:
    """A tick that stays in flight (a slow vendor) while a rival worker keeps trying to lease
    the run; it notes whether the rival got the run while this tick still ran."""

    async def slow_tick(_deps: object, _run_id: str, **_kw: object) -> TickResult:
        seen["ran"] = True
        deadline = time.monotonic() + limit_s
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
        return TickResult("ticked alone")

    return slow_tick


def _failing_once(real: Any) -> Any:
    calls = {"n": 0}

    def renew(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # one blip: a dropped connection, a statement timeout
            raise OperationalError("UPDATE runs", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    return renew


def test_one_failed_heartbeat_does_not_end_an_api_ticks_renewals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: tick_under_lease's heartbeat dies on its first store error (the exception
    escapes its loop), so the tick runs on unrenewed past its TTL and a worker leases the run beside
    it."""
    store, run_id = _store_with_run(tmp_path)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(leased_tick, "tick", _rival_tick(store, run_id, seen, limit_s=5.0))
    monkeypatch.setattr(leases, "renew", _failing_once(leases.renew))
    deps = SimpleNamespace(store=store)
    try:
        asyncio.run(tick_under_lease(deps, run_id, "api-a", lease_s=1.5))  # type: ignore[arg-type]
    except (LeaseHeld, asyncio.CancelledError):
        pass
    finally:
        store.dispose()
    assert not seen.get("overlap"), (
        "a worker leased the run while the API tick still ran: one failed heartbeat write "
        "stopped renewing for good"
    )


def test_a_worker_whose_heartbeat_keeps_failing_stops_before_its_lease_lapses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the worker logs a failed heartbeat and carries on: when renewals fail for
    longer than the lease, its ticks are never cancelled although the lease has lapsed, and another
    worker ticks the same run at the same time."""
    store, run_id = _store_with_run(tmp_path)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(worker, "tick", _rival_tick(store, run_id, seen, limit_s=5.0))

    def renew_many(*_a: Any, **_kw: Any) -> set[str]:
        raise OperationalError("UPDATE runs", {}, Exception("canceling statement: lock timeout"))

    monkeypatch.setattr(leases, "renew_many", renew_many)
    deps = SimpleNamespace(store=store)
    cfg = WorkerConfig(concurrency=1, lease_s=1.5, heartbeat_s=0.3, once=True, drain_timeout_s=20.0)
    try:
        asyncio.run(Worker(deps, cfg).run())  # type: ignore[arg-type]
    finally:
        store.dispose()
    assert seen, "the worker never ticked the run"
    assert not seen.get("overlap"), (
        "worker-b leased the run while the first worker's tick still ran on a lapsed lease"
    )


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_ticker_whose_clock_runs_ahead_cannot_take_a_live_lease(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: leases are stamped and compared with each process's own clock, not the
    store's: a process whose clock runs two minutes ahead (another host on one PostgreSQL; on SQLite
    every process shares one host's clock) sees a fresh 60 s lease as expired and takes the run
    while its holder is still ticking it."""
    store = open_store(db_url)
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id
    try:
        with store.session() as s:
            assert leases.acquire(s, run_id, "worker-a", 60)
        monkeypatch.setattr(leases, "utcnow", lambda: utcnow() + timedelta(minutes=2))
        with store.session() as s:
            stolen = leases.acquire(s, run_id, "worker-b", 60)
    finally:
        store.dispose()
    assert not stolen, "worker-b (clock 2 min ahead) took the run while worker-a held it"


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_run_started_or_cancelled_on_a_host_whose_clock_runs_ahead_is_due_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a new run, and a cancel, were made due at the API host's own clock while
    leases are compared with the database's: on a host ten minutes ahead, no worker would tick
    the new run, or carry out the cancel, for ten minutes."""
    from procure.agent import cancel

    ahead = lambda: utcnow() + timedelta(minutes=10)  # noqa: E731
    store = open_store(db_url)
    try:
        monkeypatch.setattr(repo, "utcnow", ahead)
        monkeypatch.setattr(cancel, "utcnow", ahead)
        with store.session() as s:
            run_id = repo.create_run(
                s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
            ).id
        with store.session() as s:
            assert leases.acquire_due(s, "worker-a", 60, 10) == [run_id], "the new run was not due"
            leases.release(s, run_id, "worker-a", next_tick_in_s=3600)
        cancel.request_cancel(store, run_id, by="u")
        with store.session() as s:
            assert leases.acquire_due(s, "worker-a", 60, 10) == [run_id], "the cancel was not due"
    finally:
        store.dispose()
