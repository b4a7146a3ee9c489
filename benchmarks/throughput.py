"""Worker throughput: ticks per second and tick latency (p50/p99) of `procure worker`.

Not a test: a script. For each store (SQLite, PostgreSQL) and each number of active runs it seeds
a fresh database with that many runs, each with a paid job running at one of the two mock
vendors, then starts one worker process (and, on PostgreSQL, two) and measures for `--seconds`
after a warm-up. The vendors and the facilitator are in-process in each worker (httpx
ASGITransport over the mock vendor apps and the facilitator app, the mock vendors' x402 resource
server holding the in-process `x402Facilitator`): no sockets, so the figures are the worker's
own cost (tick + store + the vendor app's request handling, all on one core per worker).

The mix: every tick is a poll of a running job (mock jobs last a million seconds, runs are due
again at once): load the run's state, GET /job-status from the vendor, write the job's and the
run's progress, then (batched) the tick log row and the lease release. The first poll of each
job also stores its first log line. Starting jobs (quote + x402 payment settled on the local
chain) is a different workload, bounded by the chain; it is not measured here.

Figures come from the tick log: ticks whose [started_at, finished_at] lie in the measured window.
Latency is a tick's own duration inside the worker (concurrent ticks share one event loop, so it
includes waiting for the others' store calls).

On PostgreSQL it also measures, on the same database, the floor no implementation can beat here:
the bare statements one poll needs (take the lease, read the run's and job's hot state, write
the job's progress, write the run's progress and release the lease) issued directly with
psycopg from one process, one poll per transaction ("floor 1") and batched as the worker
batches them, `concurrency // 4` polls per transaction with executemany ("floor B"). The floor
makes no vendor call; procure's ticks each include one (the in-process vendor app's handling
and the HTTP client), so procure / floor is the share of the store's limit that is left to it.

    .venv/bin/python benchmarks/throughput.py                      # 100, 1000, 10000 runs
    .venv/bin/python benchmarks/throughput.py --runs 100 --seconds 3 --backends sqlite
    .venv/bin/python benchmarks/throughput.py --profile --runs 1000 --backends postgres

PostgreSQL: `--postgres-url` (default PROCURE_BENCH_POSTGRES_URL or PROCURE_TEST_POSTGRES_URL),
an admin URL; a fresh database is created per measurement and dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import make_url

from procure.agent.runtime import close_deps, make_deps
from procure.agent.tick import AgentDeps
from procure.agent.worker import Worker, WorkerConfig
from procure.models import JobStatus, PaymentStatus, RunStatus, usd_to_micros
from procure.payments.chain import LocalChain, make_facilitator
from procure.payments.facilitator import create_facilitator_app
from procure.settings import Settings
from procure.store import Store, open_store, repo
from procure.store.tables import JobRow, PaymentRow, RunRow, TickLogRow
from procure.vendors.credentials import KEY_ENV, Keyring
from procure.vendors.mock import MockVendorConfig, create_mock_vendor_app
from procure.vendors.registry import default_vendors

SECRET = "bench-secret"
# One credential key for the seeding process and every worker (each has its own home).
BENCH_KEY = base64.urlsafe_b64encode(b"procure-throughput-benchmark-key").decode()
FACILITATOR_URL = "http://facilitator.bench"
JOB_SECONDS = 1e6  # jobs never finish during a measurement: every tick is a poll


def vendor_host(vendor_id: str) -> str:
    return f"{vendor_id.replace('_', '-')}.bench"


class HostRouter(httpx.AsyncBaseTransport):
    """Sends each request to the in-process ASGI app that serves its host."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self._transports = {host: httpx.ASGITransport(app) for host, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transports[request.url.host].handle_async_request(request)


# --- seeding -------------------------------------------------------------------------------


def seed(url: str, runs: int) -> None:
    """Vendors (in-process endpoints) and `runs` runs, each with a paid job running."""
    store = open_store(url)
    now = datetime.now(UTC)
    vendors = default_vendors(credential=Keyring(BENCH_KEY).encrypt(SECRET))
    with store.session() as s:
        for v in vendors:
            v.endpoint = f"http://{vendor_host(v.vendor_id)}"
            repo.save_vendor(s, v)
    run_rows, job_rows, pay_rows = [], [], []
    for i in range(runs):
        vendor = vendors[i % len(vendors)]
        run_id, job_id, pay_id = (uuid.uuid4().hex[:24] for _ in range(3))
        amount = vendor.base_price_per_hour
        spec = {"gpu_type": "A100", "hours": 1.0, "epochs": 3}
        run_rows.append(
            {
                "id": run_id,
                "user_id": "bench",
                "goal": "throughput",
                "status": RunStatus.running,
                "budget_total": usd_to_micros(5),
                "budget_remaining": usd_to_micros(5) - amount,
                "job_spec": {**spec, "model": "tiny-llm", "dataset": "dataset-a"},
                "progress": 0.0,
                "next_tick_at": now,
                "created_at": now,
                "updated_at": now,
            }
        )
        job_rows.append(
            {
                "id": job_id,
                "run_id": run_id,
                "vendor_id": vendor.vendor_id,
                "vendor_job_id": f"vgpu-{job_id}",
                "status": JobStatus.running,
                "expected_cost": amount,
                "job_params": {"gpuType": "A100", "hours": 1.0, "epochs": 3},
                "idempotency_key": f"job-{job_id}",
                "progress": 0.0,
                "log_cursor": 0,
                "created_at": now,
                "updated_at": now,
            }
        )
        pay_rows.append(
            {
                "id": pay_id,
                "run_id": run_id,
                "job_id": job_id,
                "vendor_id": vendor.vendor_id,
                "amount": amount,
                "currency": "USD",
                "status": PaymentStatus.completed,
                "x402_tx_id": "0x" + uuid.uuid4().hex * 2,
                "nonce": "0x" + uuid.uuid4().hex * 2,
                "pay_to": vendor.pay_to,
                "created_at": now,
                "updated_at": now,
            }
        )
    with store.session() as s:
        for table, rows in ((RunRow, run_rows), (JobRow, job_rows), (PaymentRow, pay_rows)):
            for start in range(0, len(rows), 2000):
                s.execute(insert(table), rows[start : start + 2000])
    store.dispose()


@contextmanager
def fresh_database(backend: str, pg_admin: str | None, workdir: Path):
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        return
    if not pg_admin:
        raise SystemExit("PostgreSQL: pass --postgres-url or set PROCURE_BENCH_POSTGRES_URL")
    name = f"procure_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_admin, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(pg_admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- one worker with in-process vendors ----------------------------------------------------


def in_process_deps(url: str, home: Path) -> tuple[AgentDeps, Store]:
    """A worker's deps over the store at `url`, with the facilitator and the two mock vendors
    in this process; the vendors adopt the store's running jobs as paid and running."""
    chain = LocalChain(None)
    facilitator = make_facilitator(chain)
    os.environ[KEY_ENV] = BENCH_KEY  # the key seed() encrypted the vendors' credential with
    store = open_store(url, upgrade=False, pre_ping=False)  # as `procure worker` opens it
    apps: dict[str, Any] = {"facilitator.bench": create_facilitator_app(chain)}
    with store.session() as s:
        running = s.execute(
            select(JobRow.vendor_id, JobRow.vendor_job_id, JobRow.idempotency_key)
            .join(RunRow, RunRow.id == JobRow.run_id)
            .where(JobRow.status == JobStatus.running, RunRow.status == RunStatus.running)
        ).all()
    for vendor in default_vendors():
        cfg = MockVendorConfig(
            vendor_id=vendor.vendor_id,
            name=vendor.name,
            price_per_hour=vendor.base_price_per_hour,
            secret=SECRET,
            pay_to=vendor.pay_to or "",
            network=chain.network,
            asset=chain.token_address,
            asset_extra=chain.payment_extra,
            job_seconds=JOB_SECONDS,
        )
        app = create_mock_vendor_app(cfg, facilitator)
        for vendor_id, vendor_job_id, key in running:
            if vendor_id == vendor.vendor_id:
                params = {"gpuType": "A100", "hours": 1.0, "epochs": 3}
                app.state.adopt_job(
                    vendor_job_id, key, params, hours=1.0, amount=vendor.base_price_per_hour
                )
        apps[vendor_host(vendor.vendor_id)] = app
    settings = Settings(
        PROCURE_DATABASE_URL=url,
        PROCURE_HOME=home,
        GPU_VENDOR_SECRET=SECRET,
        X402_FACILITATOR_URL=FACILITATOR_URL,
        VENDOR_TIMEOUT_S=30,
    )  # type: ignore[call-arg]
    router = HostRouter(apps)
    deps = make_deps(settings, store, vendor_transport=router, facilitator_transport=router)
    return deps, store


async def run_worker_for(deps: AgentDeps, concurrency: int, until: float) -> int:
    worker = Worker(deps, WorkerConfig(concurrency=concurrency, poll_interval_s=0.0))
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(max(0.0, until - time.time()))
    worker.stop()
    stats = await task
    return stats.ticks


def child(args: argparse.Namespace) -> None:
    """One worker process: set up, say ready, wait for the start time on stdin, run, exit."""
    with tempfile.TemporaryDirectory() as home:
        deps, store = in_process_deps(args.url, Path(home))
        print("ready", flush=True)
        until = float(sys.stdin.readline())
        cpu = time.process_time()
        ticks = asyncio.run(_child_run(deps, args.concurrency, until))
        cpu = time.process_time() - cpu
        store.dispose()
    print(json.dumps({"ticks": ticks, "cpu_s": cpu}), flush=True)


async def _child_run(deps: AgentDeps, concurrency: int, until: float) -> int:
    try:
        return await run_worker_for(deps, concurrency, until)
    finally:
        await close_deps(deps)


# --- measuring -----------------------------------------------------------------------------


def measure(url: str, workers: int, concurrency: int, warmup: float, seconds: float) -> dict:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", "--url", url, "--concurrency", str(concurrency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for proc in procs:
        line = proc.stdout.readline() if proc.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"worker did not start: {line!r}")
    start = time.time() + 0.2
    begin, end = start + warmup, start + warmup + seconds
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{end + 0.5}\n")
        proc.stdin.flush()
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=warmup + seconds + 120)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    # The worker processes' own CPU per tick (all ticks of the run, warm-up included): a
    # figure that holds when the machine is shared, unlike ticks/s.
    cpu_ms = 1000 * sum(r["cpu_s"] for r in reports) / max(1, sum(r["ticks"] for r in reports))
    store = open_store(url, upgrade=False)
    t0 = datetime.fromtimestamp(begin, UTC)
    t1 = datetime.fromtimestamp(end, UTC)
    with store.session() as s:
        rows = s.execute(
            select(TickLogRow.started_at, TickLogRow.finished_at, TickLogRow.outcome).where(
                TickLogRow.started_at >= t0, TickLogRow.finished_at <= t1
            )
        ).all()
    store.dispose()
    latencies = sorted((f - s_).total_seconds() * 1000 for s_, f, _ in rows)
    polls = sum(1 for *_, outcome in rows if outcome.startswith("Job running"))
    return {
        "ticks": len(rows),
        "tps": len(rows) / seconds,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "polls": polls,
        "cpu_ms": cpu_ms,
    }


def floor(url: str, batch: int, seconds: float) -> dict[str, float]:
    """Polls/s of the bare statements, one poll per transaction and `batch` per transaction."""
    import psycopg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    owner, ttl = "floor", 60.0
    lease = (
        "UPDATE runs SET lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s)"
        " WHERE id = %s AND (lease_owner IS NULL OR lease_expires_at < now())"
    )
    read = (
        "SELECT r.id, r.progress, r.status, r.budget_remaining, r.cancel_requested_at, j.id,"
        " j.progress, j.log_cursor, j.status, j.checkpoint_progress, j.vendor_id, j.vendor_job_id"
        " FROM runs r JOIN jobs j ON j.run_id = r.id WHERE r.id = %s AND j.status = 'running'"
    )
    read_many = read.replace("r.id = %s", "r.id = ANY(%s)")
    job = "UPDATE jobs SET progress = %s, log_cursor = %s, updated_at = now() WHERE id = %s"
    release = (
        "UPDATE runs SET progress = %s, lease_owner = NULL, lease_expires_at = NULL,"
        " next_tick_at = now(), updated_at = now() WHERE id = %s AND lease_owner = %s"
    )
    figures: dict[str, float] = {}
    with psycopg.connect(dsn) as conn:
        run_ids = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY id")]
        conn.commit()
        for name, size in (("floor_1", 1), ("floor_b", batch)):
            polls, i = 0, 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                ids = [run_ids[(i + k) % len(run_ids)] for k in range(size)]
                i += size
                with conn.transaction(), conn.cursor() as cur:
                    if size == 1:
                        cur.execute(lease, (owner, ttl, ids[0]))
                        rows = cur.execute(read, (ids[0],)).fetchall()
                    else:
                        cur.executemany(lease, [(owner, ttl, run_id) for run_id in ids])
                        rows = cur.execute(read_many, (ids,)).fetchall()
                    cur.executemany(job, [(row[6] + 1e-6, row[7] + 1, row[5]) for row in rows])
                    cur.executemany(release, [(row[1] + 1e-6, row[0], owner) for row in rows])
                polls += len(rows)
            figures[name] = polls / seconds
    return figures


def profile(url: str, concurrency: int, seconds: float, *, cprofile: bool = True) -> None:
    with tempfile.TemporaryDirectory() as home:
        deps, store = in_process_deps(url, Path(home))

        async def go() -> int:
            try:
                return await run_worker_for(deps, concurrency, time.time() + seconds)
            finally:
                await close_deps(deps)

        profiler = cProfile.Profile(time.process_time)  # CPU time, not waiting
        if cprofile:
            profiler.enable()
        cpu = time.process_time()
        ticks = asyncio.run(go())
        cpu = time.process_time() - cpu
        profiler.disable()
        store.dispose()
    per_tick = 1000 * cpu / max(ticks, 1)
    print(f"{ticks} ticks in {seconds:g}s ({ticks / seconds:.0f}/s), {per_tick:.2f} ms CPU/tick")
    if not cprofile:
        return
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="100,1000,10000", help="active runs, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--concurrency", type=int, default=128, help="ticks in flight per worker")
    parser.add_argument("--no-two-workers", action="store_true", help="skip 2 workers on PG")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("PROCURE_BENCH_POSTGRES_URL")
        or os.environ.get("PROCURE_TEST_POSTGRES_URL"),
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one in-process worker")
    parser.add_argument(
        "--in-process", action="store_true", help="run one worker in this process, no measuring"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    runs_list = [int(r) for r in args.runs.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for runs in runs_list:
                plans = [1, 2] if backend == "postgres" and not args.no_two_workers else [1]
                if args.profile or args.in_process:
                    plans = [1]
                for workers in plans:
                    with fresh_database(backend, args.postgres_url, Path(tmp)) as url:
                        open_store(url).dispose()  # migrate
                        seed(url, runs)
                        if args.profile or args.in_process:
                            print(f"== {backend}, {runs} runs, 1 worker in this process")
                            profile(url, args.concurrency, args.seconds, cprofile=args.profile)
                            continue
                        r = measure(url, workers, args.concurrency, args.warmup, args.seconds)
                        if backend == "postgres" and workers == 1:
                            r.update(floor(url, max(1, args.concurrency // 4), args.seconds))
                    r.update(backend=backend, runs=runs, workers=workers)
                    results.append(r)
                    floors = (
                        f"  floor 1 {r['floor_1']:6.0f}/s, floor B {r['floor_b']:6.0f}/s"
                        if "floor_1" in r
                        else ""
                    )
                    print(
                        f"{backend:9} {runs:6} runs  {workers} worker(s): {r['tps']:7.0f} ticks/s"
                        f"  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms"
                        f"  worker CPU {r['cpu_ms']:.2f} ms/tick"
                        f"  ({r['polls']}/{r['ticks']} polls){floors}",
                        flush=True,
                    )
    if not results:
        return
    print()
    load = os.getloadavg()[0]
    print(
        f"concurrency {args.concurrency} per worker, {args.seconds:g}s measured after "
        f"{args.warmup:g}s warm-up; mix: polls of running jobs; {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the end"
    )
    print(
        "| store | runs | workers | ticks/s | p50 ms | p99 ms | CPU ms/tick | 2 workers / 1 "
        "| floor 1 polls/s | floor B polls/s | procure / floor 1 | procure / floor B |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    one = {(r["backend"], r["runs"]): r["tps"] for r in results if r["workers"] == 1}
    for r in results:
        ratio = ""
        if r["workers"] == 2 and one.get((r["backend"], r["runs"])):
            ratio = f"{r['tps'] / one[(r['backend'], r['runs'])]:.2f}"
        floors = "| | | |"
        if "floor_1" in r:
            floors = (
                f"{r['floor_1']:.0f} | {r['floor_b']:.0f} | {r['tps'] / r['floor_1']:.0%} | "
                f"{r['tps'] / r['floor_b']:.0%} |"
            )
        print(
            f"| {r['backend']} | {r['runs']} | {r['workers']} | {r['tps']:.0f} | "
            f"{r['p50']:.1f} | {r['p99']:.1f} | {r['cpu_ms']:.2f} | {ratio} | {floors}"
        )


if __name__ == "__main__":
    main()
