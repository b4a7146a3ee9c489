"""The fair fleet benchmark as its reader relies on it: every policy meets the same world and
finishes the same work, none under the floor; the billing increment only ever adds; failures
restart jobs from their checkpoint; and `benchmarks/fleet.py --json` prints one row per
(workload, billing, policy) with the keys the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from procure.clouds.mockworld.workload import synthetic
from procure.fleet.policies import ProcurePolicy, navarch, seed_rule, static
from procure.fleet.settings import FleetSettings
from procure.sim.fleet_peers import ClusterAutoscaler, navarch_queue, pack
from procure.sim.fleet_world import World, run, work_floor_usd

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {
    "jobs_per_hour": 6.0,
    "bursts": 1,
    "burst_jobs": 6,
    "gpu_weights": {1: 0.5, 2: 0.2, 4: 0.2, 8: 0.1},
    "mean_duration_s": 1800.0,
    "duration_sigma": 1.2,
    "max_duration_s": 3 * 3600.0,
}


def cfg(**kw: object) -> FleetSettings:
    base: dict[str, object] = {
        "_env_file": None,
        "dry_run": False,
        "action_cooldown_mins": 0,
        "max_instances": 16,
        "max_hourly_spend": 100.0,
        "confirmation_threshold": 1e6,
        "default_instance_type": "gpu_1x_a100",
    }
    return FleetSettings(**(base | kw))  # type: ignore[arg-type]


def test_every_policy_finishes_the_same_work_within_the_caps_and_never_under_the_floor() -> None:
    jobs = synthetic(4, hours=3, **SHAPE)  # type: ignore[arg-type]
    world = World(billing_s=60.0, boot_s=300.0)
    floor = work_floor_usd(jobs, world)
    big = {"default_instance_type": "gpu_8x_a100"}
    policies = {
        "static": (static(3), cfg(**big)),
        "seed-rule": (seed_rule, cfg(**big, min_instances=1, action_cooldown_mins=30)),
        "cluster-autoscaler": (ClusterAutoscaler(seed=1), cfg()),
        "navarch": (navarch, cfg(**big, min_instances=1, action_cooldown_mins=5)),
        "navarch-queue": (navarch_queue, cfg(**big, action_cooldown_mins=5)),
        "procure": (ProcurePolicy(target_wait_s=600), cfg()),
    }
    rows = {
        name: run(name, decide, settings, jobs, "tiny", world, hours=3)
        for name, (decide, settings) in policies.items()
    }
    for name, r in rows.items():
        assert r.completed == r.jobs == len(jobs), name
        assert r.cap_violations == 0, name
        assert r.cost_usd >= floor - 1e-6, name
    # The 8-GPU jobs ran: every rule had a node that holds them.
    assert any(j.gpus == 8 for j in jobs)
    # procure packs each job on a type its size: less idle than the rules on 8-GPU nodes.
    assert rows["procure"].idle_gpu_hours < rows["navarch-queue"].idle_gpu_hours


def test_a_longer_billing_increment_only_adds_and_failures_restart_jobs() -> None:
    jobs = synthetic(5, hours=2, **SHAPE)  # type: ignore[arg-type]
    costs = []
    for increment in (1.0, 60.0, 3600.0):
        world = World(billing_s=increment, boot_s=300.0)
        r = run(
            "static", static(4), cfg(default_instance_type="gpu_8x_a100"), jobs, "t", world, hours=2
        )
        costs.append(r.cost_usd)
    assert costs[0] <= costs[1] < costs[2]  # the same fleet, billed by second, minute, hour
    flaky = World(billing_s=60.0, boot_s=300.0, failures_per_gpu_hour=0.5, seed=3)
    first = run("procure", ProcurePolicy(target_wait_s=0), cfg(), jobs, "t", flaky, hours=2)
    again = run("procure", ProcurePolicy(target_wait_s=0), cfg(), jobs, "t", flaky, hours=2)
    assert first.failures > 0 and first.completed == len(jobs)  # restarted, then finished
    assert first == again  # the same draws for the same launches: runs replay


def test_cluster_autoscaler_packs_pending_pods_onto_new_nodes() -> None:
    assert pack([1, 1, 2, 4], [], 8) == (1, [])  # all on one 8-GPU node
    assert pack([4, 4, 2], [2], 4) == (2, [])  # the 2 fits the free room
    assert pack([8], [], 4) == (0, [8])  # too big for this group


def test_the_benchmark_prints_one_json_row_per_workload_billing_and_policy() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fleet.py"),
            "--quick",
            "--json",
            "--profile",
            "diurnal",
            "--hours",
            "2",
            "--max-duration-h",
            "1",
            "--targets",
            "0,60",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=ROOT,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert {r["billing"] for r in rows} == {"second", "minute", "hour"}
    policies = {r["policy"] for r in rows}
    assert {"procure", "static-peak", "seed-rule", "cluster-autoscaler", "navarch"} <= policies
    assert {"navarch-queue", "procure@0m", "procure@60m"} <= policies
    assert len(rows) == 3 * len(policies)
    for r in rows:
        assert {"workload", "billing", "policy", "cost_usd", "floor_usd", "p95_wait_min"} <= set(r)
        assert r["cost_usd"] >= r["floor_usd"] - 1e-6
