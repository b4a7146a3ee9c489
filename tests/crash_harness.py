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
points, drains every run, and the final invariants are checked:

* every run is terminal, and no payment is left pending;
* no EIP-3009 nonce is used twice, and every nonce the wallet used on the chain belongs to a
  payment the store holds as completed (never failed);
* the chain's transfers to each vendor equal the store's completed payments to it, in count,
  sum and transaction hashes;
* no vendor started a job twice for one idempotency key, and every started job is a job the
  store paid for;
* no run's completed and pending payments ever exceed its budget.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

ZERO = "0x" + "0" * 40
SECRET = "crash-test-secret"

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


@dataclass
class CrashReport:
    kills: int = 0
    by_signal: int = 0
    by_crash_point: Counter[str] = field(default_factory=Counter)
    lifetimes_s: list[float] = field(default_factory=list)
    runs: Counter[str] = field(default_factory=Counter)
    payments: Counter[str] = field(default_factory=Counter)
    transfers: int = 0
    paid_usd: float = 0.0
    vendor_submissions: int = 0
    vendor_starts: int = 0
    vendor_replays: int = 0
    vendor_renewals: int = 0
    """Slices bought as jobs ran (each its own payment): the campaign covers renewals."""
    cancels_requested: int = 0
    reconciled_jobs: int = 0
    checks: int = 0
    seconds: float = 0.0
    setup_s: float = 0.0
    """Until the first worker was forked (the world, the zygote's imports)."""
    drain_s: float = 0.0
    check_s: float = 0.0
    missed: Counter[str] = field(default_factory=Counter)
    """Scheduled crash points whose worker was killed by the backstop, not at the point."""
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        lifetimes = sorted(self.lifetimes_s)
        data.pop("lifetimes_s")
        data["median_life_s"] = round(lifetimes[len(lifetimes) // 2], 3) if lifetimes else 0
        data["by_crash_point"] = dict(sorted(self.by_crash_point.items()))
        data["missed"] = dict(self.missed)
        data["runs"] = dict(self.runs)
        data["payments"] = dict(self.payments)
        data["paid_usd"] = round(self.paid_usd, 6)
        data["seconds"] = round(self.seconds, 1)
        data["setup_s"] = round(self.setup_s, 1)
        data["drain_s"] = round(self.drain_s, 1)
        data["check_s"] = round(self.check_s, 1)
        data["kills_per_s"] = round(self.kills / self.seconds, 2) if self.seconds else 0
        return data


class InvariantViolation(AssertionError):
    pass


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
    import httpx

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
    world: _World | None = None
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
        world = _World(store, chain, wallet, {v.vendor_id: v for v in vendors}, servers[1:])
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
                _check(world, budget, final=False)
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
                    + _stuck(store)
                )
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        zygote.result()
        report.drain_s = time.monotonic() - drain_started
        _check(world, budget, final=True)

        report.by_crash_point = Counter(crash_log.read_text().split())
        _tally(world, report)
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
    world: _World,
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
                        world.set_faults({})
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
    world: _World,
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


def _ready(world: _World, point: str, report: CrashReport, new_run: Callable[[], None]) -> bool:
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
        world.set_faults({"overcharge_factor": 3.0})
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


@dataclass
class _World:
    store: Any
    chain: Any
    wallet: str
    vendors: dict[str, Any]
    vendor_servers: list[Any]
    used: list[dict[str, Any]] = field(default_factory=list)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    http: Any = None

    def refresh_chain(self) -> None:
        """Read the chain's new events only (a full scan per check grows with the chain)."""
        after = self.used[-1]["block_number"] + 1 if self.used else 0
        self.used += self.chain.used_authorizations(self.wallet, from_block=after)
        after = self.transfers[-1]["block_number"] + 1 if self.transfers else 0
        self.transfers += self.chain.transfers(from_block=after)

    def client(self) -> Any:
        import httpx

        if self.http is None:  # one client: a new one per call costs a TLS context (30 ms)
            self.http = httpx.Client(headers={"Authorization": f"Bearer {SECRET}"}, timeout=30)
        return self.http

    def set_faults(self, faults: dict[str, Any]) -> None:
        """The same faults on every vendor (`{}`: none)."""
        for server in self.vendor_servers:
            self.client().post(f"{server.url}/admin/faults", json=faults).raise_for_status()

    def vendor_stats(self) -> dict[str, dict[str, Any]]:
        stats = {}
        for vendor_id, server in zip(self.vendors, self.vendor_servers, strict=True):
            response = self.client().get(f"{server.url}/admin/stats")
            response.raise_for_status()
            stats[vendor_id] = response.json()
        return stats


def _stuck(store: Any) -> str:
    """The last words of the runs still running, to say why they are."""
    from procure.store import repo

    lines = []
    with store.session() as s:
        for run in repo.list_runs(s, limit=5, status="running"):
            state = repo.load_state(s, run.id)
            if state is not None:
                lines.append(f"{run.id}: {[o.content[:160] for o in state.observations[-2:]]}")
    return "; ".join(lines)


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


def _check(world: _World, budget: int, *, final: bool) -> None:
    """Every invariant that must hold at any moment (and, if `final`, at the end)."""
    from sqlalchemy import select

    from procure.store.tables import JobRow, PaymentRow, RunRow

    problems: list[str] = []
    with world.store.session() as s:
        runs = list(s.scalars(select(RunRow)))
        jobs = list(s.scalars(select(JobRow)))
        payments = list(s.scalars(select(PaymentRow)))
    by_nonce = {p.nonce.lower(): p for p in payments}
    jobs_by_key = {j.idempotency_key: j for j in jobs}

    # Money: completed + pending never above the budget; budgetRemaining agrees with the store.
    committed: Counter[str] = Counter()
    completed: Counter[str] = Counter()
    for p in payments:
        if p.status in ("completed", "pending"):
            committed[p.run_id] += p.amount
        if p.status == "completed":
            completed[p.run_id] += p.amount
    active: Counter[str] = Counter(j.run_id for j in jobs if j.status in ("submitted", "running"))
    for run in runs:
        if committed[run.id] > run.budget_total:
            problems.append(f"run {run.id}: {committed[run.id]} committed > {run.budget_total}")
        if active[run.id] > 1:
            problems.append(f"run {run.id}: {active[run.id]} active jobs")
        if final and run.budget_remaining != run.budget_total - completed[run.id]:
            problems.append(f"run {run.id}: budgetRemaining {run.budget_remaining} is stale")
        if final and run.status == "running":
            problems.append(f"run {run.id} is still running")

    # The chain: each nonce used once, each used nonce a payment the store does not call failed.
    world.refresh_chain()
    used_nonces = [(u["nonce"], u["tx_hash"]) for u in world.used]
    if len({n for n, _ in used_nonces}) != len(used_nonces):
        problems.append("a nonce was used twice on the chain")
    tx_of_nonce = dict(used_nonces)
    for nonce, tx in used_nonces:
        payment = by_nonce.get(nonce)
        if payment is None:
            problems.append(f"nonce {nonce} settled (tx {tx}) but no payment holds it")
        elif payment.status == "failed":
            problems.append(f"payment {payment.id} is failed but settled on chain (tx {tx})")
        elif final and payment.status != "completed":
            problems.append(f"payment {payment.id} settled on chain but left {payment.status}")
    for p in payments:
        if p.status == "completed" and p.nonce.lower() not in tx_of_nonce:
            problems.append(f"payment {p.id} completed in the store, never settled on chain")
        if p.status == "completed" and p.x402_tx_id not in (None, tx_of_nonce.get(p.nonce.lower())):
            problems.append(f"payment {p.id} records tx {p.x402_tx_id}, the chain another")
        if final and p.status == "pending":
            problems.append(f"payment {p.id} left pending")

    # Transfers to each vendor equal the store's completed payments to it.
    # (The chain moves on while we look: a dead worker's request may still settle. Events are
    # read after the store, and transfers after authorisations, so newer transfers are left out.)
    settled_txs = set(tx_of_nonce.values())
    transfers = [t for t in world.transfers if t["from"].lower() == world.wallet.lower()]
    if final and len(transfers) != len(used_nonces):
        problems.append(f"{len(transfers)} transfers from the wallet, {len(used_nonces)} nonces")
    transfers = [t for t in transfers if t["tx_hash"] in settled_txs]
    for vendor_id, vendor in world.vendors.items():
        on_chain = sorted(t["value"] for t in transfers if t["to"] == vendor.pay_to)
        in_store = sorted(
            p.amount
            for p in payments
            if p.vendor_id == vendor_id
            and p.status in (("completed",) if final else ("completed", "pending"))
        )
        if final and on_chain != in_store:
            problems.append(f"{vendor_id}: chain paid {on_chain}, store completed {in_store}")
        if not final and len(on_chain) > len(in_store):
            problems.append(f"{vendor_id}: {len(on_chain)} transfers > {len(in_store)} payments")

    # Vendors: one start (or slice) per key at most, only for what the store paid for.
    by_id = {p.id: p for p in payments}
    for vendor_id, stats in world.vendor_stats().items():
        for key, figures in stats["keys"].items():
            if figures["started"] > 1:
                problems.append(f"{vendor_id} started key {key} {figures['started']} times")
            if not figures["started"]:
                continue
            if key.startswith("slice-"):  # a renewal: one payment of its own
                slice_payment = by_id.get(key.removeprefix("slice-"))
                paid = [slice_payment] if slice_payment is not None else []
            else:
                job = jobs_by_key.get(key)
                paid = [p for p in payments if job is not None and p.job_id == job.id]
            if not paid:
                problems.append(f"{vendor_id} started key {key}, unknown to the store")
            elif final and not any(p.status == "completed" for p in paid):
                problems.append(f"{vendor_id} started key {key}, its payment not completed")
    if problems:
        raise InvariantViolation("; ".join(problems[:20]))


def _tally(world: _World, report: CrashReport) -> None:
    from sqlalchemy import func, select

    from procure.store.tables import ObservationRow, PaymentRow, RunRow

    with world.store.session() as s:
        report.runs = Counter(
            dict(s.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all())
        )  # type: ignore[arg-type]
        report.payments = Counter(
            dict(
                s.execute(select(PaymentRow.status, func.count()).group_by(PaymentRow.status)).all()
            )
        )  # type: ignore[arg-type]
        report.reconciled_jobs = int(
            s.scalar(
                select(func.count())
                .select_from(ObservationRow)
                .where(ObservationRow.content.like("%reconciled%"))
            )
            or 0
        )
    world.refresh_chain()
    transfers = [t for t in world.transfers if t["from"].lower() == world.wallet.lower()]
    report.transfers = len(transfers)
    report.paid_usd = sum(t["value"] for t in transfers) / 1e6
    for stats in world.vendor_stats().values():
        report.vendor_submissions += stats["submissions"]
        report.vendor_starts += stats["started"]
        report.vendor_replays += stats["replays"]
        report.vendor_renewals += sum(
            1 for key, k in stats["keys"].items() if key.startswith("slice-") and k["started"]
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
