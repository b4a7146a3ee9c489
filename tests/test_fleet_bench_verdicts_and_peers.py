"""The fleet benchmark's verdicts and peers: cluster-autoscaler scales up past a pod no node group
fits, and neither the default row nor the best peer is a run that left work undone. Tiny
workloads of a few simulated hours, the benchmark's own functions."""

from __future__ import annotations

from pathlib import Path

from benchmark_scripts import benchmark
from procure.clouds.mockworld.workload import JobSpec
from procure.sim.fleet_peers import ClusterAutoscaler
from procure.sim.fleet_world import REGIONS, Result, World, default_capacity, run

ROOT = Path(__file__).resolve().parents[1]
SCAN_S = 60.0


def test_cluster_autoscaler_scales_up_for_pods_behind_one_no_node_group_fits() -> None:
    """Before the fix: the cluster-autoscaler peer stops its scale-up at the first pending pod
    that no node group with capacity fits (`break`), so once the 8-GPU nodes are out of stock an
    8-GPU job at the head of the queue keeps every 1-GPU job behind it waiting for hours, where
    the real autoscaler skips that pod and launches for the others (as procure's policy does)."""
    fb = benchmark("fleet")
    capacity = default_capacity()
    capacity["gpu_8x_a100"] = {r: (1 if r == REGIONS[0] else 0) for r in REGIONS}
    world = World(billing_s=60.0, failures_per_gpu_hour=0.0, capacity=capacity)
    # Two long 8-GPU jobs (one 8-GPU node in stock) and a short 1-GPU job behind them.
    jobs = [JobSpec(0.0, 8, 4 * 3600.0), JobSpec(0.0, 8, 4 * 3600.0), JobSpec(0.0, 1, 600.0)]
    ca = ClusterAutoscaler(seed=1)
    r = run("cluster-autoscaler", ca, fb.settings("cluster-autoscaler"), jobs, "t", world, hours=1)
    assert r.completed == 3, r
    # Waits: the first 8-GPU job and the 1-GPU job one boot and a scan or two; the second
    # 8-GPU job waits for the first to end. The median is the 1-GPU job's.
    assert r.wait_p50_s <= world.boot_s + 3 * SCAN_S, r


def _row(workload: str, policy: str, cost: float, p95_min: float, completed: int = 10) -> Result:
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
        completed=completed,
        jobs=10,
    )


def test_the_default_is_not_within_the_floor_goal_when_it_left_jobs_unfinished() -> None:
    """Before the fix: `verdicts` reads the default procure row's cost over the floor whether or
    not it finished its jobs; a run that left half the work undone is billed for half of it and
    reads "default at most 1.000 x floor (met <= 1.10)"."""
    fb = benchmark("fleet")
    rows = [
        _row("a", "cluster-autoscaler", 100.0, 30.0),
        _row("a", "procure", 40.0, 30.0, completed=5),
        _row("a", "procure@10m", 90.0, 20.0),
    ]
    out = fb.verdicts(rows, {"a": 40.0})
    goal = next(line for line in out if "goal:" in line)
    assert "(met ≤ 1.10)" not in goal, goal


def test_the_best_peer_is_one_that_finished_its_jobs() -> None:
    """Before the fix: `verdicts` takes the cheapest peer row as the best peer even when it left
    jobs unfinished (a one-node rule that never drains its queue is cheap because it did less),
    and measures procure's goal against that run instead of the cheapest peer that did the work."""
    fb = benchmark("fleet")
    rows = [
        _row("a", "seed-rule", 50.0, 300.0, completed=6),
        _row("a", "cluster-autoscaler", 100.0, 30.0),
        _row("a", "procure", 80.0, 30.0),
    ]
    out = fb.verdicts(rows, {"a": 75.0})
    best = [line for line in out if "(best peer)" in line]
    assert len(best) == 1 and "cluster-autoscaler" in best[0], out
