"""The fair fleet benchmark (issue 20) is fair in its figures: a peer's cooldown spaces its
decisions, not each launch; Navarch's reactive rule is the documented one; idle GPU-hours count
the paid rest of an increment; a job's wait is counted once; a workload procure does not reach
fails the goal vs the best peer. Tiny workloads of a few simulated hours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmark_scripts import benchmark
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.monitor import InstanceView
from procure.fleet.policies import FleetSignal, Policy
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.fleet.settings import FleetSettings
from procure.sim.fleet_peers import ClusterAutoscaler, navarch_queue, navarch_reactive
from procure.sim.fleet_world import Result, World, run

ROOT = Path(__file__).resolve().parents[1]
SCAN_S = 60.0


def test_navarch_queue_scales_to_its_target_in_one_decision() -> None:
    """Before the fix: Navarch's queue-based autoscaler scales the pool to its target node count in
    one scaling action (`PoolManager.actOnRecommendation` calls `ScaleUp(count)`), and its 5-minute
    cooldown is between scaling actions. The sim applies the cooldown to every single launch, so
    four 8-GPU jobs arriving together get their nodes 5 minutes apart and the peer's p95 is inflated
    by 15 minutes (the benchmark then compares procure at that inflated p95)."""
    fb = benchmark("fleet")
    jobs = [JobSpec(0.0, 8, 7200.0) for _ in range(4)]
    world = World(billing_s=60.0, failures_per_gpu_hour=0.0)
    r = run("navarch-queue", navarch_queue, fb.settings("navarch-queue"), jobs, "t", world, hours=1)
    assert r.completed == 4
    # All four nodes launched at the first scan: every job waits one boot (and the scan).
    assert r.wait_p95_s <= world.boot_s + 2 * SCAN_S, r
    assert r.blocked == 0, r


def test_navarch_reactive_waits_only_its_cooldown_not_every_boot() -> None:
    """Before the fix: Navarch's reactive autoscaler adds a node whenever the pool's utilisation
    (averaged over the nodes that report metrics, so not the booting ones) is above 80 % and the
    5-minute cooldown is over. The sim's `navarch` also refuses to launch while any node boots, so
    with 10-minute boots it grows one node per boot (11 min) instead of one per cooldown (5 min)."""
    fb = benchmark("fleet")
    jobs = [JobSpec(0.0, 1, 3 * 3600.0) for _ in range(24)]
    world = World(billing_s=60.0, failures_per_gpu_hour=0.0)
    r = run("navarch", navarch_reactive, fb.settings("navarch"), jobs, "t", world, hours=1)
    assert r.completed == 24
    # Node 1 (the minimum) launched at 1 min, up at 11; node 2 launched then, node 3 a cooldown
    # later (16 min), up at 26 min: the last 8 jobs start then.
    assert r.wait_p95_s <= 26 * 60 + SCAN_S, r


def _mover(moves: int) -> Policy:
    """A policy that keeps two 1-GPU nodes and moves the one job between them `moves` times
    (terminate the node that holds it: the scheduler restarts it at once on the other)."""
    done = [0]

    def decide(
        views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, signal: FleetSignal
    ) -> list[Proposal]:
        running = [v for v in views if v.instance.status in ("booting", "active")]
        active = [v for v in running if v.instance.status == "active"]
        free = dict(signal.free_gpus)
        launch = Proposal(PROVISION, None, "spare", "gpu_1x_a100", "us-east-1", 1_290_000)
        if done[0] >= moves:
            return []
        if len(running) < 2:
            return [launch] * (2 - len(running))
        holder = next((v for v in active if free.get(v.id) == 0), None)
        if len(active) == 2 and holder is not None and signal.queued_jobs == 0:
            done[0] += 1
            i = holder.instance
            return [Proposal(TERMINATE, holder.id, "move", i.instance_type, i.region, 1_290_000)]
        return []

    return decide


def test_a_restarted_job_counts_once_with_all_its_waits() -> None:
    """Before the fix: each placement of a job appends a wait sample (`Cluster._start`), so a job
    restarted at once elsewhere (a move, an eviction, a failure) adds a 0-second sample: p95 is over
    placements, not jobs. Here the only job waited one boot before it first ran, yet the reported
    p50 and p95 waits are 0."""
    world = World(billing_s=60.0, boot_s=120.0, failures_per_gpu_hour=0.0)
    cfg = benchmark("fleet").settings("procure")
    r = run("mover", _mover(19), cfg, [JobSpec(0.0, 1, 600.0)], "t", world, hours=1)
    assert r.completed == 1 and r.terminations == 19
    waited = world.boot_s + SCAN_S  # launched at the first scan, placed when it booted
    assert r.wait_p95_s >= waited, r
    assert r.wait_p50_s >= waited, r


def test_idle_gpu_hours_count_the_paid_rest_of_an_hourly_increment() -> None:
    """Before the fix: billed by the hour, a node let go 20 minutes in is paid for the whole hour,
    but `idle_gpu_hours` counts only the seconds it ran (`run` sums raw seconds, not increments): a
    policy that lets nodes go early (cluster-autoscaler) shows a fraction of the idle GPU-hours it
    paid for, while procure, which keeps them to the hour's end, shows all."""
    fb = benchmark("fleet")
    world = World(billing_s=3600.0, failures_per_gpu_hour=0.0)
    jobs = [JobSpec(0.0, 1, 600.0)]
    ca = ClusterAutoscaler(seed=1)
    r = run("cluster-autoscaler", ca, fb.settings("cluster-autoscaler"), jobs, "t", world, hours=1)
    assert r.completed == 1 and r.launches == 1
    paid_gpu_h = r.cost_usd / 1.29  # every type costs $1.29 per GPU-hour
    assert paid_gpu_h >= 1.0 - 1e-6, r  # at least one whole hour of at least one GPU
    busy_gpu_h = 600.0 / 3600
    # What a reader adds up: busy + idle = the GPU-hours paid for (here 10 min of work).
    assert r.idle_gpu_hours >= round(paid_gpu_h - busy_gpu_h, 2) - 0.01, r


def _row(workload: str, policy: str, cost: float, p95_min: float) -> Result:
    return Result(
        policy=policy,
        workload=workload,
        billing="minute",
        cost_usd=cost,
        idle_gpu_hours=0.0,
        wait_p50_s=0.0,
        wait_p95_s=p95_min * 60,
        launches=1,
        terminations=1,
        blocked=0,
        refusals=0,
        failures=0,
        cap_violations=0,
        completed=10,
        jobs=10,
    )


def test_the_goal_vs_the_best_peer_fails_when_one_workload_is_missed() -> None:
    """Before the fix: `verdicts` averages procure's saving against the best peer only over the
    workloads where some procure target reaches that peer's p95: a workload it cannot match is
    dropped from the average instead of failing it, so the goal line reads "met" while on workload
    `a` no procure setting comes near the best peer's queue wait."""
    fb = benchmark("fleet")
    rows = [
        _row("a", "cluster-autoscaler", 100.0, 10.0),
        _row("a", "procure", 50.0, 30.0),
        _row("b", "cluster-autoscaler", 100.0, 30.0),
        _row("b", "procure", 50.0, 30.0),
    ]
    out = fb.verdicts(rows, {"a": 40.0, "b": 40.0})
    assert any("[MISSED] a: cluster-autoscaler" in line for line in out), out
    goal = next(line for line in out if "goal:" in line)
    assert "(met ≥ 10 %)" not in goal, goal
