"""Workers: real `procure worker` processes (and API ticks) against one store, never ticking a
run twice at once (invariant 4), every run finishing (5), the money adding up (1, 3).

The proof of "one step at a time" is the tick log: every tick, by a worker or the API, writes
its [started_at, finished_at] interval inside its lease; the intervals of one run must never
overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from procure.agent.worker import Worker, WorkerConfig, WorkerLockHeld, sqlite_worker_lock
from procure.api.app import create_app
from procure.local import free_port, serve
from procure.models import TERMINAL_RUN_STATUSES
from procure.store import leases, repo
from procure.store.tables import JobRow, PaymentRow, RunRow, TickLogRow
from world import POSTGRES_ENV, World, postgres_database, start_world

# Vendor 1 fails part-way in 20% of its jobs; no cool-down, so it keeps being chosen and failing.
FLAKY = {"gpu_vendor_1": {"fail_rate": 0.2, "fail_at": 0.5}}


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    with postgres_database() as url:
        yield url


def _env(world: World) -> dict[str, str]:
    s = world.settings
    return {
        **os.environ,
        "PROCURE_DATABASE_URL": s.database_url,
        "PROCURE_HOME": str(s.home),
        "GPU_VENDOR_SECRET": s.gpu_vendor_secret.get_secret_value(),
        "X402_FACILITATOR_URL": s.facilitator_url,
        # The local facilitator settles one payment at a time: a burst of starts queues there.
        "VENDOR_TIMEOUT_S": "30",
        "VENDOR_COOLDOWN_S": "0",
        # The local chain mines one block per settlement and each block's timestamp is at
        # least its parent's + 1 s: a burst of ~80 settlements in ~10 s runs the chain's clock
        # ~60 s ahead of the wall clock. An authorisation valid for only a minute then expired
        # on the chain before it was settled, and its run waited the minute out (most of this
        # test's time). Valid for longer than the whole test's settlements can push the
        # chain's clock ahead; still half the default, so a payment in doubt for another
        # reason still ends well inside the test's limit.
        "PROCURE_PAYMENT_WINDOW_S": "150",
        "PROCURE_PAYMENT_MARGIN_S": "1",
        # Whole-job payments: this test is about leases and money under concurrency, and
        # pay-as-you-go slices (tested in test_slices.py) would multiply the settlements that
        # the one local chain must serialise.
        "PAYMENT_OVERHEAD_USD": "5",
        "PROCURE_FIRST_SLICE_FRACTION": "1",  # nor a short first slice of an unproven vendor
    }


def _procure(world: World, *args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "procure.cli", *args],
        env=_env(world),
        cwd=world.tmp,  # no stray .env
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _stop(procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """SIGTERM: a worker finishes its ticks, releases its leases and exits 0."""
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    problems = []
    for proc, log in procs:
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "killed: it ignored SIGTERM"
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully
        allowed = {0, -signal.SIGTERM} if "serve" in proc.args else {0}
        if code not in allowed:
            problems.append(f"{proc.args} exited {code}:\n{log.read_text()[-3000:]}")
    assert not problems, "\n".join(problems)


def _new_runs(world: World, n: int) -> list[str]:
    return [world.new_run(budget=5.0) for _ in range(n)]


def _open_runs(world: World, run_ids: list[str]) -> int:
    with world.store.session() as s:
        rows = s.execute(select(RunRow.status).where(RunRow.id.in_(run_ids))).scalars()
        return sum(1 for status in rows if status not in TERMINAL_RUN_STATUSES)


def _wait_all_done(world: World, run_ids: list[str], procs: list[Any], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while (left := _open_runs(world, run_ids)) > 0:
        for proc, log in procs:
            assert proc.poll() is None, f"{proc.args} died:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{left} of {len(run_ids)} runs still open: " + (
            _stuck(world, run_ids)
        )
        time.sleep(0.25)


def _stuck(world: World, run_ids: list[str]) -> str:
    """The last observations of the runs still open, to say why they are."""
    lines = []
    with world.store.session() as s:
        for run_id in run_ids:
            state = repo.load_state(s, run_id)
            if state is not None and state.run.status not in TERMINAL_RUN_STATUSES:
                last = [o.content[:120] for o in state.observations[-3:]]
                lines.append(f"{run_id}: {last}")
    return "\n".join(lines[:10])


def _tick_log(world: World) -> list[TickLogRow]:
    with world.store.session() as s:
        return list(s.scalars(select(TickLogRow).order_by(TickLogRow.id)))


def assert_one_tick_at_a_time(ticks: list[TickLogRow]) -> None:
    by_run: dict[str, list[TickLogRow]] = defaultdict(list)
    for t in ticks:
        assert t.started_at <= t.finished_at, t
        by_run[t.run_id].append(t)
    for run_id, run_ticks in by_run.items():
        run_ticks.sort(key=lambda t: t.started_at)
        for before, after in itertools.pairwise(run_ticks):
            assert after.started_at >= before.finished_at, (
                f"run {run_id} ticked twice at once: {before.owner} "
                f"[{before.started_at}, {before.finished_at}] and {after.owner} "
                f"[{after.started_at}, {after.finished_at}]"
            )


def assert_money_invariants(world: World, run_ids: list[str]) -> None:
    with world.store.session() as s:
        runs = {r.id: r for r in s.scalars(select(RunRow).where(RunRow.id.in_(run_ids)))}
        payments = list(s.scalars(select(PaymentRow)))
        jobs = list(s.scalars(select(JobRow)))
    assert len(runs) == len(run_ids)
    for run in runs.values():
        mine = [p for p in payments if p.run_id == run.id]
        completed = sum(p.amount for p in mine if p.status == "completed")
        pending = sum(p.amount for p in mine if p.status == "pending")
        assert completed + pending <= run.budget_total, run.id
        assert run.budget_remaining == run.budget_total - completed, run.id
    # Exactly once: no nonce or idempotency key twice; every completed payment's nonce is used
    # on the chain, no failed one is.
    assert len({p.nonce for p in payments}) == len(payments)
    assert len({j.idempotency_key for j in jobs}) == len(jobs)
    payer = world.deps().account.address
    for p in payments:
        used = world.chain.authorization_state(payer, p.nonce)
        assert used == (p.status == "completed"), (p.id, p.status, used)
    # The chain's transfers to each vendor's payee are the store's completed payments to it.
    transfers = world.chain.transfers()
    for vendor in world.vendors.values():
        on_chain = sorted((t["tx_hash"], t["value"]) for t in transfers if t["to"] == vendor.pay_to)
        in_store = sorted(
            (p.x402_tx_id, p.amount)
            for p in payments
            if p.vendor_id == vendor.vendor_id and p.status == "completed"
        )
        assert on_chain == in_store, vendor.vendor_id
    # Every lease was given back.
    assert all(r.lease_owner is None for r in runs.values())


@pytest.mark.timeout(600)
def test_two_workers_and_api_ticks_on_postgres(tmp_path: Path, pg_url: str) -> None:
    """Two `procure worker` processes plus many concurrent API ticks on 40 runs (each run is
    ticked by both workers and the API many times over: more runs would prove nothing more,
    only settle more payments on the one local chain). Fewer runs put more ticks on each, so
    more contend for its lease; 40 keep some of vendor 1's jobs failing (0.8**40: about one
    run in 7,500 sees none) and more runs due than the workers' 16 slots."""
    world = start_world(tmp_path, pg_url, vendor_overrides=FLAKY, fund_usd=2000, job_seconds=0.4)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        run_ids = _new_runs(world, 40)
        api_port = free_port()
        api_log = tmp_path / "api.log"
        api = _procure(world, "serve", "--no-worker", "--port", str(api_port), log=api_log)
        procs.append((api, api_log))
        for i in range(2):
            log = tmp_path / f"worker{i}.log"
            args = ["worker", "--concurrency", "8", "--poll-interval", "0.1", "--lease", "30"]
            procs.append((_procure(world, *args, log=log), log))

        codes: dict[int, int] = defaultdict(int)
        stop = asyncio.Event()

        async def hammer(client: httpx.AsyncClient) -> None:
            rng = random.Random()
            while not stop.is_set():
                try:
                    r = await client.post("/api/agent-tick", json={"runId": rng.choice(run_ids)})
                except httpx.TransportError:  # the server is not up yet
                    await asyncio.sleep(0.2)
                    continue
                codes[r.status_code] += 1
                assert r.status_code in (200, 409), r.text
                if r.status_code == 409:
                    # The holder is named, unless its lease ended between our try and the look.
                    assert "is being ticked by" in r.json()["error"], r.text

        async def drive() -> None:
            url = f"http://127.0.0.1:{api_port}"
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                hammers = [asyncio.create_task(hammer(client)) for _ in range(8)]
                try:
                    # generous: a payment refused under load waits out its authorisation first
                    await asyncio.to_thread(_wait_all_done, world, run_ids, procs, 480)
                finally:
                    stop.set()
                    await asyncio.gather(*hammers)

        asyncio.run(drive())
    finally:
        _stop(procs)
    try:
        with world.store.session() as s:
            statuses = s.scalars(select(RunRow.status).where(RunRow.id.in_(run_ids))).all()
        assert set(statuses) == {"completed"}
        ticks = _tick_log(world)
        assert_one_tick_at_a_time(ticks)
        owners = {t.owner.split("-")[0] for t in ticks}
        assert owners == {"worker", "api"}, owners
        assert len({t.owner for t in ticks if t.owner.startswith("worker-")}) == 2
        assert codes[200] > 0 and codes[409] > 0, dict(codes)
        assert_money_invariants(world, run_ids)
        with world.store.session() as s:  # some jobs failed and were retried elsewhere
            failed = s.scalars(select(JobRow).where(JobRow.status == "failed")).all()
        assert failed
    finally:
        world.stop()


def test_one_worker_on_sqlite(tmp_path: Path, sqlite_url: str) -> None:
    world = start_world(tmp_path, sqlite_url, vendor_overrides=FLAKY, fund_usd=500, job_seconds=0.3)
    try:
        run_ids = _new_runs(world, 30)
        log = tmp_path / "worker.log"
        args = ["worker", "--concurrency", "8", "--poll-interval", "0.05"]
        proc = _procure(world, *args, log=log)
        try:
            deadline = time.monotonic() + 30
            while not _tick_log(world):  # the worker is up and holds the SQLite worker lock
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            # One worker per SQLite file: a second one refuses to start.
            second = subprocess.run(
                [sys.executable, "-m", "procure.cli", "worker"],
                env=_env(world),
                cwd=tmp_path,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert second.returncode == 1
            assert b"another worker already runs" in second.stdout + second.stderr
            _wait_all_done(world, run_ids, [(proc, log)], 60)
        finally:
            _stop([(proc, log)])
        with world.store.session() as s:
            statuses = s.scalars(select(RunRow.status).where(RunRow.id.in_(run_ids))).all()
        assert set(statuses) == {"completed"}
        assert_one_tick_at_a_time(_tick_log(world))
        assert_money_invariants(world, run_ids)
    finally:
        world.stop()


def test_sqlite_worker_lock(sqlite_url: str) -> None:
    from procure.store import open_store

    store = open_store(sqlite_url)
    try:
        with sqlite_worker_lock(store), pytest.raises(WorkerLockHeld):  # noqa: SIM117
            with sqlite_worker_lock(store):
                pass
        with sqlite_worker_lock(store):  # released
            pass
    finally:
        store.dispose()


def test_tick_endpoint_respects_the_lease(world: World) -> None:
    server = serve(create_app(world.settings, world.store))
    try:
        api = httpx.Client(base_url=server.url, timeout=30)
        run_id = world.new_run()
        with world.store.session() as s:
            assert leases.acquire(s, run_id, "worker-elsewhere", 60)
        response = api.post("/api/agent-tick", json={"runId": run_id})
        assert response.status_code == 409, response.text
        assert response.json()["holder"] == "worker-elsewhere"
        assert "worker-elsewhere" in response.json()["error"]
        with world.store.session() as s:
            leases.release(s, run_id, "worker-elsewhere")
        response = api.post("/api/agent-tick", json={"runId": run_id})
        assert response.status_code == 200, response.text
        assert response.json()["message"] == "Job started"
        missing = api.post("/api/agent-tick", json={"runId": "nope"})
        assert missing.status_code == 404
        # The API's tick is in the tick log, and its lease was released.
        (logged,) = _tick_log(world)
        assert (logged.run_id, logged.outcome) == (run_id, "Job started")
        assert logged.owner.startswith("api-")
        with world.store.session() as s:
            assert leases.holder(s, run_id) is None
    finally:
        server.stop()


def test_serve_runs_a_worker_in_process(world: World) -> None:
    """`procure serve` (create_app with a worker): runs advance with nobody calling tick, and
    shutdown drains the worker and releases its leases."""
    cfg = WorkerConfig(concurrency=4, poll_interval_s=0.05)
    app = create_app(world.settings, world.store, worker=cfg)
    server = serve(app)
    try:
        api = httpx.Client(base_url=server.url, timeout=30)
        run_ids = []
        for _ in range(3):
            started = api.post(
                "/api/agent-start", json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}
            )
            assert started.status_code == 201, started.text
            run_ids.append(started.json()["_id"])
        deadline = time.monotonic() + 60
        while _open_runs(world, run_ids):
            assert time.monotonic() < deadline, "runs did not finish under the in-process worker"
            time.sleep(0.1)
        worker = app.state.worker
        assert isinstance(worker, Worker) and worker.stats.ticks > 0
    finally:
        server.stop()
    with world.store.session() as s:
        for run_id in run_ids:
            state = repo.load_state(s, run_id)
            assert state is not None and state.run.status == "completed"
            assert leases.holder(s, run_id) is None
    assert_one_tick_at_a_time(_tick_log(world))


def test_worker_once_and_max_ticks(world: World) -> None:
    """The loop's own stops: `once` ticks one batch; `max_ticks` stops after that many."""
    run_ids = [world.new_run() for _ in range(5)]

    async def go(cfg: WorkerConfig) -> int:
        deps = world.deps()
        try:
            return (await Worker(deps, cfg).run()).ticks
        finally:
            from procure.agent.runtime import close_deps

            await close_deps(deps)

    assert asyncio.run(go(WorkerConfig(concurrency=3, once=True, poll_interval_s=0))) == 3
    assert asyncio.run(go(WorkerConfig(concurrency=2, max_ticks=4, poll_interval_s=0))) == 4
    ticks = _tick_log(world)
    assert len(ticks) == 7
    assert {t.run_id for t in ticks} == set(run_ids)
    assert_one_tick_at_a_time(ticks)
    with world.store.session() as s:
        assert all(leases.holder(s, r) is None for r in run_ids)
