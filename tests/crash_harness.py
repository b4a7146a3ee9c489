"""Crash testing: kill the worker at random moments, many times, and prove that no money is lost
or paid twice (`tests/test_crash.py`, `benchmarks/crash.py`).

The facilitator (on a journaled local chain) and two mock vendors run in this process on
loopback and are never killed. Workers run in child processes forked from a *zygote*, a
process that imported procure once, so that a restart costs milliseconds rather than the
seconds of a cold Python start. Each worker dies one of two ways: at a named crash point
(`procure.crashpoints`: between signing and sending, between the vendor's answer and the
store's write, ...), or by SIGKILL from the zygote after a random lifetime. The tests kill by
schedule (`CrashConfig.rounds`: every point of the worker's path in turn, so that each is
covered whatever the machine's speed); the benchmark at random, with probabilities. After
every death the dead worker's leases are released (a supervisor that saw it die may do so) and
the invariants are checked; then the next worker starts. At the end a last worker, without crash
points, drains every run, and the final invariants are checked. The invariants (never over
budget, never paid twice, the chain's and the store's ledgers agreeing, no job started twice)
are in `tests/crash_checks.py`; this module starts the world and kills and restarts workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from crash_checks import (
    SECRET,
    CrashReport,
    CrashWorld,
    InvariantViolation,
    check_invariants,
    stuck_runs,
    tally,
)

WORKER_POINTS = (
    "intent",
    "signed",
    "paid",
    "reconciled",
    "recorded",
    "cancel_sent",
    "polled",
    "refused",
)
"""The crash points (`procure.crashpoints.POINTS`) on the x402 worker's path, in the order a
round of the schedule kills at them."""
ELSEWHERE = {
    "fleet_intent": "tests/test_fleet_crash.py",
    "fleet_launched": "tests/test_fleet_crash.py, tests/test_gateway_crash.py",
    "fleet_terminated": "tests/test_fleet_crash.py",
}
"""The crash points the worker never passes, and the tests that kill at them instead."""
SET_UP_BY = {"reconciled": "paid", "cancel_sent": "recorded"}
"""Points reached only in a state that a death at another point leaves (see `_prepare`)."""


@dataclass
class CrashConfig:
    kills: int = 200
    """Worker deaths to inflict before the final drain."""
    database_url: str | None = None
    """Defaults to a SQLite file in the work directory."""
    workdir: Path | None = None
    active_runs: int = 10
    """Runs kept going at once; new ones are started as others end."""
    budget_usd: float = 5.0
    crash_at: str = (
        "intent:0.15,signed:0.25,paid:0.25,recorded:0.15,reconciled:0.25,refused:0.25,polled:0.04,"
        "cancel_sent:0.6"
    )
    """Crash points and probabilities for the killed workers (see procure.crashpoints)."""
    max_life_s: float = 1.2
    """Each worker is SIGKILLed after a lifetime drawn uniformly from [0, max_life_s]."""
    job_seconds: float = 0.4
    grace_s: float = 60.0
    """How long a vendor's job paused at the end of its paid time waits for the next slice.
    Generous: the mock's default (a second) is shorter than a renewal takes on a busy machine,
    and a job that expires for it leaves its slice payment in doubt for the payment window."""
    fail_rate: float = 0.3
    """Vendor 1 fails part-way in this share of its jobs (vendor 2 never does)."""
    payment_overhead_usd: float = 0.05
    """What the planner counts per payment: next to nothing, so it often pays in slices and
    workers are killed while slices are bought (renewals) too."""
    cancel_every: int = 10
    """After every n-th death, a user asks to cancel a random running run."""
    concurrency: int = 16
    check_every: int = 1
    """Check the invariants after every n-th death (the chain part is the costly one)."""
    drain_timeout_s: float = 120.0
    seed: int | None = None
    verbose: bool = False
    rounds: int = 0
    """Scheduled deaths (the tests): `rounds` times over, a worker dies at each point of
    `WORKER_POINTS` in turn (at its 1st, 2nd or 3rd hit, by round), each followed by one
    SIGKILLed after a random lifetime; `kills`, `crash_at` and `cancel_every` are then unused.
    Each point is died at `rounds` times at least, whatever the machine's speed (`_scheduled`)."""
    point_life_s: float = 90.0
    """The backstop of a scheduled death: a worker that has not reached its point by then is
    SIGKILLed and the point counted in `CrashReport.missed` (a point the path no longer
    passes, not a slow machine: reaching one takes well under a second)."""


# --- the zygote and its workers (child processes) ------------------------------------------


def _worker(cmd: dict[str, Any], transports: tuple[Any, Any]) -> None:
    """A forked worker: tick runs until killed (it never returns on its own). `transports`
    (vendors, facilitator) were built before the fork, unused: their TLS contexts cost 30 ms
    each to make."""
    import asyncio

    from procure import crashpoints
    from procure.agent.runtime import close_deps, make_deps
    from procure.agent.worker import WorkerConfig, run_worker
    from procure.settings import Settings
    from procure.store import open_store

    crashpoints.configure(cmd.get("crash"), cmd.get("log"))
    os.environ.update(cmd.get("env") or {})
    settings = Settings()

    async def work() -> None:
        store = open_store(settings.database_url, upgrade=False)
        deps = make_deps(
            settings, store, vendor_transport=transports[0], facilitator_transport=transports[1]
        )
        cfg = WorkerConfig(
            concurrency=cmd["concurrency"],
            lease_s=10.0,
            heartbeat_s=2.0,
            poll_interval_s=0.05,
            settle_every_s=1.0,
            owner=cmd["owner"],
        )
        try:
            await run_worker(deps, cfg)
        finally:
            await close_deps(deps)

    asyncio.run(work())


def _zygote() -> None:
    """Import everything once, then fork a worker per request (one JSON command per line)."""
    # The signing code that procure loads at a process's first payment (eth_account and the
    # SDK's EVM scheme: procure.payments.payer and .wallet) is loaded here, once, before the
    # forks: else every worker loads it again (~0.8 s of CPU each, dozens a campaign).
    import eth_account  # noqa: F401
    import httpx
    import x402.mechanisms.evm.exact
    import x402.mechanisms.evm.signers
    import x402.mechanisms.evm.v1.constants  # noqa: F401

    import procure.agent.runtime
    import procure.agent.worker
    import procure.store  # noqa: F401  (imported before forking, once)

    def pair() -> tuple[Any, Any]:
        return httpx.AsyncHTTPTransport(), httpx.AsyncHTTPTransport()

    out = sys.stdout
    transports = pair()
    while line := sys.stdin.readline():
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            return
        pid = os.fork()
        if pid == 0:
            try:
                _worker(cmd, transports)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(0)
        started = time.monotonic()
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        transports = pair()  # the next worker's, made while this one works
        deadline = started + cmd["life_s"] if cmd.get("life_s") is not None else None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        lived = time.monotonic() - started
        how = (
            "signal"
            if os.WIFSIGNALED(status)
            else ("crash" if os.WEXITSTATUS(status) == 137 else "exit")
        )
        code = os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"pid": pid, "how": how, "code": code, "lived": lived}) + "\n")
        out.flush()


class Zygote:
    def __init__(self, env: dict[str, str], log: IO[str]) -> None:
        self.live: int | None = None  # the worker alive now
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            bufsize=1,
        )

    def _send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote died (exit {self.proc.poll()}); see its log")
        return dict(json.loads(line))

    def spawn(self, **cmd: Any) -> int:
        self._send({"cmd": "spawn", **cmd})
        self.live = int(self._read()["pid"])
        return self.live

    def result(self) -> dict[str, Any]:
        answer = self._read()
        self.live = None
        return answer

    def close(self) -> None:
        if self.live is not None:  # the campaign failed (or timed out) while a worker lived
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.live, signal.SIGKILL)
        try:
            self._send({"cmd": "exit"})
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# --- the campaign ---------------------------------------------------------------------------


def run_campaign(cfg: CrashConfig) -> CrashReport:
    """Start the world, kill `cfg.kills` workers, drain, check; raise on any violation."""
    from procure.local import mock_vendor_config, start_facilitator, start_mock_vendor
    from procure.models import JobSpec, usd_to_micros
    from procure.payments.wallet import load_or_create_account
    from procure.store import open_store, repo
    from procure.vendors.credentials import Keyring
    from procure.vendors.registry import default_vendors

    rng = random.Random(cfg.seed)
    work = cfg.workdir or Path(tempfile.mkdtemp(prefix="procure-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    db_url = cfg.database_url or f"sqlite:///{work / 'procure.db'}"
    crash_log = work / "crashes.log"
    crash_log.write_text("")
    report = CrashReport()
    started = time.monotonic()

    log = (work / "workers.log").open("a")
    # The zygote first: its imports (seconds on a busy machine) overlap the world's start. Its
    # workers get the world's settings with each command.
    zygote = Zygote({k: v for k, v in os.environ.items() if k != "PROCURE_CRASH_AT"}, log)
    world: CrashWorld | None = None
    servers: list[Any] = []
    store = None
    try:
        facilitator = start_facilitator(work / "chain-journal.jsonl")
        servers.append(facilitator)
        store = open_store(db_url)
        chain = facilitator.app.state.chain
        home = work / "home"
        # The workers (PROCURE_HOME=home) open the vendors' credential with home's secret.key.
        vendors = default_vendors(
            network=chain.network,
            asset=chain.token_address,
            credential=Keyring.load(home).encrypt(SECRET),
        )
        for vendor in vendors:
            fail_rate = cfg.fail_rate if vendor.vendor_id == "gpu_vendor_1" else 0.0
            vcfg = mock_vendor_config(
                vendor,
                facilitator.url,
                SECRET,
                job_seconds=cfg.job_seconds,
                fail_rate=fail_rate,
                grace_seconds=cfg.grace_s,
            )
            server = start_mock_vendor(vcfg, facilitator.url)
            servers.append(server)
            vendor.endpoint = server.url
        with store.session() as s:
            for vendor in vendors:
                repo.save_vendor(s, vendor)
        wallet = load_or_create_account(None, home).address
        chain.mint(wallet, usd_to_micros(1_000_000))

        env = {
            "PROCURE_DATABASE_URL": db_url,
            "PROCURE_HOME": str(home),
            "GPU_VENDOR_SECRET": SECRET,
            "X402_FACILITATOR_URL": facilitator.url,
            "VENDOR_TIMEOUT_S": "20",  # a busy machine's slow answer is not a vendor's fault
            "VENDOR_COOLDOWN_S": "0.5",
            "PLANNER_MODE": "heuristic",
            # Short-lived authorisations, so that a payment left in doubt by a crash (a retry
            # the vendor turned down) is settled within the campaign, not five minutes later.
            "PROCURE_PAYMENT_WINDOW_S": "30",
            "PROCURE_PAYMENT_MARGIN_S": "1",
            "PAYMENT_OVERHEAD_USD": str(cfg.payment_overhead_usd),
        }
        world = CrashWorld(store, chain, wallet, {v.vendor_id: v for v in vendors}, servers[1:])
        budget = usd_to_micros(cfg.budget_usd)
        created = 0

        def top_up(extra: int = 0) -> None:
            nonlocal created
            with store.session() as s:
                running = repo.count_runs_by_status(s).get("running", 0)
                for _ in range(cfg.active_runs - running + extra):
                    repo.create_run(
                        s,
                        user_id="crash",
                        goal=f"crash test run {created}",
                        budget_total=budget,
                        job_spec=JobSpec(hours=1.0, epochs=3),
                    )
                    created += 1

        def life(crash: str | None, life_s: float) -> str:
            """One worker's life and death, and what follows a death; returns how it died."""
            owner = f"crash-{report.kills}"
            zygote.spawn(
                owner=owner,
                crash=crash,
                log=str(crash_log),
                life_s=life_s,
                concurrency=cfg.concurrency,
                env=env,
            )
            report.setup_s = report.setup_s or time.monotonic() - started
            result = zygote.result()
            if result["how"] == "exit":
                raise RuntimeError(f"worker exited by itself ({result}); see {work}/workers.log")
            report.kills += 1
            report.lifetimes_s.append(result["lived"])
            if result["how"] == "signal":
                report.by_signal += 1
            _release_leases(store, owner)
            if report.kills % cfg.check_every == 0:
                report.checks += 1
                checked = time.monotonic()
                check_invariants(world, budget, final=False)
                report.check_s += time.monotonic() - checked
            if cfg.verbose and report.kills % 50 == 0:
                print(f"{report.kills} kills, {created} runs", file=sys.stderr)
            return str(result["how"])

        if cfg.rounds:
            _scheduled(cfg, rng, report, world, life, top_up, lambda: top_up(extra=1))
        else:
            while report.kills < cfg.kills:
                top_up()
                life(cfg.crash_at, rng.uniform(0, cfg.max_life_s))
                if report.kills % cfg.cancel_every == 0:
                    _cancel_one(store, rng, report)

        # The drain: one last worker without crash points finishes every run.
        pid = zygote.spawn(
            owner="drain", crash=None, log=None, life_s=None, concurrency=cfg.concurrency, env=env
        )
        drain_started = time.monotonic()
        deadline = drain_started + cfg.drain_timeout_s
        while True:
            with store.session() as s:
                running = repo.count_runs_by_status(s).get("running", 0)
                pending = len(repo.list_payments(s, status="pending"))
            if running == 0 and pending == 0:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                zygote.result()
                raise InvariantViolation(
                    f"{running} runs running, {pending} payments pending after the drain: "
                    + stuck_runs(store)
                )
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        zygote.result()
        report.drain_s = time.monotonic() - drain_started
        check_invariants(world, budget, final=True)

        report.by_crash_point = Counter(crash_log.read_text().split())
        tally(world, report)
    finally:
        zygote.close()
        if world is not None and world.http is not None:
            world.http.close()
        log.close()
        for server in reversed(servers):
            server.stop()
        if store is not None:
            store.dispose()
    report.seconds = time.monotonic() - started
    return report


def _scheduled(
    cfg: CrashConfig,
    rng: random.Random,
    report: CrashReport,
    world: CrashWorld,
    life: Callable[[str | None, float], str],
    top_up: Callable[[], None],
    new_run: Callable[[], None],
) -> None:
    """The deaths by schedule: `cfg.rounds` times, a worker dies at each of `WORKER_POINTS`
    (``point@k``: at its k-th hit in that worker), each death followed by one at a random
    moment. Which points are killed is fixed by construction; only where on a run's way the
    k-th hit falls depends on timing. Runs are topped up all along, so that every point has
    work to reach while a worker lives."""
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(0.1):
            top_up()

    top_up()
    keeper = threading.Thread(target=keep, name="top-up", daemon=True)
    keeper.start()
    try:
        for r in range(cfg.rounds):
            for i, point in enumerate(WORKER_POINTS):
                # A point that needs a state set up for it dies at its first hit.
                k = 1 if point in SET_UP_BY or point == "refused" else r % 3 + 1
                _prepare(
                    world, point, report, lambda at: _die_at(at, 1, cfg, report, life), new_run
                )
                try:
                    _die_at(point, k, cfg, report, life)
                finally:
                    if point == "refused":
                        _set_faults(world, {})
                upcoming = WORKER_POINTS[(i + 1) % len(WORKER_POINTS)]
                if SET_UP_BY.get(upcoming) != point:  # keep the state set up for the next one
                    life(None, rng.uniform(0, cfg.max_life_s))
    finally:
        stop.set()
        keeper.join()


def _die_at(
    point: str, k: int, cfg: CrashConfig, report: CrashReport, life: Callable[..., str]
) -> None:
    if life(f"{point}@{k}", cfg.point_life_s) != "crash":
        report.missed[point] += 1


def _prepare(
    world: CrashWorld,
    point: str,
    report: CrashReport,
    die_at: Callable[[str], None],
    new_run: Callable[[], None],
) -> None:
    """Bring about the state in which the next worker reaches `point`: a payment settled but
    not recorded (a death at `paid`), a cancel requested on a run whose job runs (one whose
    start a death at `recorded` left recorded), a new run and vendors that ask more in their
    402 than they quoted (our guardrail refuses its payment; a slice refused meanwhile fails
    without passing `refused`)."""
    for _ in range(3):
        if _ready(world, point, report, new_run):
            return
        if point != "reconciled":
            die_at(SET_UP_BY[point])
            continue
        # The scheduled death at `paid` fell on a slice (its retry is a replay, not a
        # reconciliation): one more, at a fresh run's first payment, every other run parked
        # meanwhile so that no slice is paid first.
        _park(world.store)
        try:
            new_run()
            die_at("paid")
        finally:
            _release_leases(world.store, PARKED)


def _ready(world: CrashWorld, point: str, report: CrashReport, new_run: Callable[[], None]) -> bool:
    from sqlalchemy import select

    from procure.agent.cancel import request_cancel
    from procure.store.tables import JobRow, PaymentRow, RunRow

    with world.store.session() as s:
        if point == "reconciled":
            nonces = s.scalars(
                select(PaymentRow.nonce)
                .join(JobRow, JobRow.id == PaymentRow.job_id)
                .join(RunRow, RunRow.id == JobRow.run_id)
                .where(
                    RunRow.status == "running",
                    JobRow.status == "submitted",
                    PaymentRow.status == "pending",
                )
            ).all()
            return any(world.chain.authorization_state(world.wallet, n) for n in nonces)
        if point == "cancel_sent":
            run_id = s.scalar(
                select(RunRow.id)
                .join(JobRow, JobRow.run_id == RunRow.id)
                .where(
                    RunRow.status == "running",
                    RunRow.cancel_requested_at.is_(None),
                    JobRow.status == "running",
                )
                .limit(1)
            )
            if run_id is None:
                return False
            request_cancel(world.store, run_id, by="crash test", reason="scheduled")
            report.cancels_requested += 1
            return True
    if point == "refused":
        _set_faults(world, {"overcharge_factor": 3.0})
        new_run()
    return True


PARKED = "crash-test-parked"


def _park(store: Any) -> None:
    """Lease every free running run to nobody, for an hour (`_release_leases` frees them)."""
    from datetime import timedelta

    from sqlalchemy import update

    from procure.models import utcnow
    from procure.store.tables import RunRow

    with store.session() as s:
        s.execute(
            update(RunRow)
            .where(RunRow.status == "running", RunRow.lease_owner.is_(None))
            .values(lease_owner=PARKED, lease_expires_at=utcnow() + timedelta(hours=1))
        )


def _cancel_one(store: Any, rng: random.Random, report: CrashReport) -> None:
    """A user cancels a running run (the next worker carries it out, or dies trying)."""
    from procure.agent.cancel import CannotCancel, request_cancel
    from procure.store import repo

    with store.session() as s:
        running = [r.id for r in repo.list_runs(s, limit=100, status="running")]
    if running:
        try:
            request_cancel(store, rng.choice(running), by="crash test", reason="campaign")
            report.cancels_requested += 1
        except CannotCancel:  # it ended meanwhile
            pass


def _set_faults(world: CrashWorld, faults: dict[str, Any]) -> None:
    """The same faults on every vendor (`{}`: none)."""
    for server in world.vendor_servers:
        world.client().post(f"{server.url}/admin/faults", json=faults).raise_for_status()


def _release_leases(store: Any, owner: str) -> None:
    """The worker is dead (reaped): its leases are free at once, not when they expire."""
    from sqlalchemy import update

    from procure.store.tables import RunRow

    with store.session() as s:
        s.execute(
            update(RunRow)
            .where(RunRow.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--active-runs", type=int, default=CrashConfig.active_runs)
    parser.add_argument("--crash-at", default=CrashConfig.crash_at)
    parser.add_argument("--max-life", type=float, default=CrashConfig.max_life_s)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--seed", type=int)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.zygote:
        _zygote()
        return 0
    report = run_campaign(
        CrashConfig(
            kills=args.kills,
            database_url=args.database_url,
            workdir=args.workdir,
            active_runs=args.active_runs,
            crash_at=args.crash_at,
            max_life_s=args.max_life,
            check_every=args.check_every,
            seed=args.seed,
            verbose=args.verbose,
        )
    )
    print(json.dumps(report.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
