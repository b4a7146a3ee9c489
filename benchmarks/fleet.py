"""The fleet benchmark: the same workloads through five scaling policies on the simulated Lambda
Cloud (boot delay, prices, per-second billing, capacity refusals), each through the
controller's real rails and action records: a static fleet sized for the peak, the seed's rule,
a cluster-autoscaler-like rule, a Navarch-like rule and procure's own policy.

    .venv/bin/python benchmarks/fleet.py                     # synthetic seeds 1, 2, 3
    .venv/bin/python benchmarks/fleet.py --seeds 1,2,3,4,5,6
    .venv/bin/python benchmarks/fleet.py --seeds 4,5 --csv jobs.csv --hours 26

Per workload and policy it prints cost, how far it is above the work-only floor, idle
GPU-hours, p50/p95 queue wait, actions, blocks, cloud refusals and cap violations (0 for every
policy: the rails hold whatever it says), and whether procure is at least 25 % cheaper than the
seed's rule with an equal or better p95. The work-only floor is what no policy can go under:
the GPU-hours the jobs need at the configured type's price per GPU-hour, plus the boot of the
minimum fleet (billed before any work can start). Where 25 % below the seed's rule is under
that floor, the goal is out of reach whatever the policy, and the verdict says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from procure.fleet.policies import ProcurePolicy, cluster_autoscaler, navarch, seed_rule, static
from procure.fleet.settings import FleetSettings
from procure.sim.fleet_engine import BenchRow, run_policy, work_floor_usd
from procure.sim.workload import JobSpec, load_csv, synthetic

MAX_INSTANCES = 10  # the seed's LAMBDA_LABS_MAX_INSTANCES
BOOT_S = 180.0  # the simulated cloud's boot delay (`run_policy`'s default)
GOAL = 0.25  # the goal: procure this much cheaper than the seed's rule
POLICIES = ("static-peak", "seed-rule", "cluster-autoscaler", "navarch", "procure")


def settings(policy: str) -> FleetSettings:
    """Each policy's configuration; the caps (instances, $/h) are the seed's for all."""
    common: dict[str, Any] = {
        "_env_file": None,
        "dry_run": False,
        "min_instances": 1,
        "max_instances": MAX_INSTANCES,
        "max_hourly_spend": 100.0,
        "scan_interval_s": 60.0,
    }
    own: dict[str, dict[str, Any]] = {
        "static-peak": {"action_cooldown_mins": 0},
        "seed-rule": {},  # 80/20 %, 15/30 min, cooldown 30 min: the defaults
        "cluster-autoscaler": {
            "action_cooldown_mins": 0,
            "low_gpu_threshold": 50,
            "low_usage_duration_mins": 10,
        },
        "navarch": {"action_cooldown_mins": 5},
        "procure": {"action_cooldown_mins": 0},
    }
    return FleetSettings(**common, **own[policy])


def peak_concurrency(jobs: list[JobSpec]) -> int:
    """GPUs the workload would use at once if every job started when submitted."""
    events = sorted(
        [(j.submit_s, j.gpus) for j in jobs] + [(j.submit_s + j.duration_s, -j.gpus) for j in jobs]
    )
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def one(args: tuple[str, str, list[JobSpec], float, float]) -> BenchRow:
    policy, workload, jobs, hours, target_min = args
    logging.getLogger("procure").setLevel(logging.CRITICAL)  # refusals are counted, not logged
    decide = {
        "static-peak": static(min(MAX_INSTANCES, peak_concurrency(jobs))),
        "seed-rule": seed_rule,
        "cluster-autoscaler": cluster_autoscaler,
        "navarch": navarch,
        "procure": ProcurePolicy(target_wait_s=target_min * 60),
    }[policy]
    return run_policy(policy, decide, settings(policy), jobs, workload, hours=hours, boot_s=BOOT_S)


def table(rows: list[BenchRow], floors: dict[str, float]) -> str:
    head = (
        f"{'workload':<10} {'policy':<19} {'cost $':>8} {'> floor':>7} {'idle GPU-h':>10} "
        f"{'p50 wait':>9} {'p95 wait':>9} {'actions':>7} {'blocked':>7} {'refused':>7} "
        f"{'cap viol.':>9} {'done':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        floor = floors[r.workload]
        above = f"{r.cost_usd / floor - 1:+.1%}" if floor else "-"
        lines.append(
            f"{r.workload:<10} {r.policy:<19} {r.cost_usd:>8.2f} {above:>7} "
            f"{r.idle_gpu_hours:>10.1f} {r.wait_p50_s / 60:>7.1f}m {r.wait_p95_s / 60:>7.1f}m "
            f"{r.actions:>7} {r.blocked:>7} {r.refusals:>7} {r.cap_violations:>9} "
            f"{r.completed:>4}/{r.jobs:<4}"
        )
    return "\n".join(lines)


def verdicts(rows: list[BenchRow], floors: dict[str, float]) -> list[str]:
    out = []
    for workload in dict.fromkeys(r.workload for r in rows):
        by = {r.policy: r for r in rows if r.workload == workload}
        ours, seed = by["procure"], by["seed-rule"]
        floor = floors[workload]
        saving = 1 - ours.cost_usd / seed.cost_usd if seed.cost_usd else 0.0
        reachable = 1 - floor / seed.cost_usd if seed.cost_usd else 0.0
        met = saving >= GOAL and ours.wait_p95_s <= seed.wait_p95_s
        word = "cheaper" if saving >= 0 else "dearer"
        goal = (1 - GOAL) * seed.cost_usd
        out.append(
            f"  [{'met' if met else 'MISSED'}] {workload}: procure ${ours.cost_usd:.2f} vs the "
            f"seed's rule ${seed.cost_usd:.2f} ({abs(saving):.1%} {word}), p95 wait "
            f"{ours.wait_p95_s / 60:.1f} vs {seed.wait_p95_s / 60:.1f} min; work-only floor "
            f"${floor:.2f}: at most {reachable:.1%} cheaper is possible"
            + (
                f", {GOAL:.0%} cheaper (${goal:.2f}) is {1 - goal / floor:.1%} under it"
                if goal < floor
                else ""
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3", help="synthetic workload seeds")
    parser.add_argument("--csv", type=Path, action="append", default=[], help="a CSV workload")
    parser.add_argument(
        "--hours", type=float, default=24.0, help="simulated hours (then on until the work is done)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--target-wait",
        type=float,
        default=ProcurePolicy.target_wait_s / 60,
        help="procure's queue-wait target, minutes (it launches when the last job queued "
        "would wait longer)",
    )
    args = parser.parse_args(argv)
    workloads: list[tuple[str, list[JobSpec]]] = [
        (f"seed {s}", synthetic(int(s))) for s in args.seeds.split(",") if s.strip()
    ]
    workloads += [(path.stem[:10], load_csv(path)) for path in args.csv]
    floors = {name: work_floor_usd(jobs, settings("procure"), BOOT_S) for name, jobs in workloads}
    tasks = [
        (p, name, jobs, args.hours, args.target_wait) for name, jobs in workloads for p in POLICIES
    ]
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(one, tasks))
    print(table(rows, floors))
    print("\n".join(verdicts(rows, floors)))
    print(f"({len(rows)} runs in {time.monotonic() - started:.0f}s)")
    violations = sum(r.cap_violations for r in rows)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
