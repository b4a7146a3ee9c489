"""The fleet benchmark: the same workloads through five scaling policies on the simulated Lambda
Cloud (boot delay, prices, per-second billing, capacity refusals), each through the
controller's real rails and action records: a static fleet sized for the peak, the seed's rule,
a cluster-autoscaler-like rule, a Navarch-like rule and procure's own policy.

Every policy runs with the same settings (the seed's caps: 10 instances, $100/h; and one
instance kept at least, `min_instances=1`, without which the seed's rule, which reads only its
instances' utilisation, would never launch a first one). procure's policy reads the job queue,
so it can also run from zero instances (`min_instances=0`, the seed's default setting): the row
`procure (min 0)` is that, the same policy with that one setting changed; nothing else differs.

    .venv/bin/python benchmarks/fleet.py                     # both profiles, seeds 1, 2, 3
    .venv/bin/python benchmarks/fleet.py --seeds 1,2,3,4,5,6
    .venv/bin/python benchmarks/fleet.py --profile diurnal --seeds 4,5
    .venv/bin/python benchmarks/fleet.py --profile none --csv jobs.csv --hours 26

Two synthetic profiles (`synthetic()`'s parameters; job durations log-normal, 30 min mean, in
both), each printed as a table of its own:

- saturated: the generator's defaults, 12 jobs/h on average (diurnal amplitude 0.6, peak at
  14:00) plus 2 bursts of 30 jobs: ~7 GPUs busy on average and peaks at and above the seed's
  10-instance cap, so every policy runs a near-full fleet all day and queues for hours.
- diurnal: a small ML team's day, 4 jobs/h on average with amplitude 0.9 (7.6 jobs/h at 14:00,
  0.4 at 02:00: the team works by day, little runs at night) plus 3 bursts of 20 jobs (a
  hyper-parameter sweep launched at once): ~3 GPUs busy on average, quiet nights, bursts that
  need the fleet to grow fast and then shrink. Chosen once from what such a day looks like,
  not tuned to any policy's result.

Per workload and policy it prints cost, how far it is above the work-only floor, idle
GPU-hours, p50/p95 queue wait, actions, blocks, cloud refusals and cap violations (0 for every
policy: the rails hold whatever it says), and, for each procure row, whether it is at least 25 %
cheaper than the seed's rule with an equal or better p95 (then on how many workloads). The
work-only floor is what no policy can go under: the GPU-hours the jobs need at the configured
type's price per GPU-hour, plus one instance's boot (the minimum fleet's, or the first
launch's: billed before any work can start). Where 25 % below the seed's rule is under that
floor, the goal is out of reach whatever the policy, and the verdict says so.
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
PROCURE_MIN0 = "procure (min 0)"  # procure's policy, scaling to zero
POLICIES = ("static-peak", "seed-rule", "cluster-autoscaler", "navarch", "procure", PROCURE_MIN0)
PROFILES: dict[str, dict[str, Any]] = {
    # The generator's defaults: 12 jobs/h, amplitude 0.6, 2 bursts of 30 jobs.
    "saturated": {},
    # A small team's day: quiet nights, busy afternoons, three sweeps.
    "diurnal": {"jobs_per_hour": 4.0, "diurnal_amplitude": 0.9, "bursts": 3, "burst_jobs": 20},
}


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
        PROCURE_MIN0: {"action_cooldown_mins": 0, "min_instances": 0},
    }
    return FleetSettings(**(common | own[policy]))


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
        PROCURE_MIN0: ProcurePolicy(target_wait_s=target_min * 60),
    }[policy]
    return run_policy(policy, decide, settings(policy), jobs, workload, hours=hours, boot_s=BOOT_S)


def table(rows: list[BenchRow], floors: dict[str, float]) -> str:
    head = (
        f"{'workload':<12} {'policy':<19} {'cost $':>8} {'> floor':>7} {'idle GPU-h':>10} "
        f"{'p50 wait':>9} {'p95 wait':>9} {'actions':>7} {'blocked':>7} {'refused':>7} "
        f"{'cap viol.':>9} {'done':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        floor = floors[r.workload]
        above = f"{r.cost_usd / floor - 1:+.1%}" if floor else "-"
        lines.append(
            f"{r.workload:<12} {r.policy:<19} {r.cost_usd:>8.2f} {above:>7} "
            f"{r.idle_gpu_hours:>10.1f} {r.wait_p50_s / 60:>7.1f}m {r.wait_p95_s / 60:>7.1f}m "
            f"{r.actions:>7} {r.blocked:>7} {r.refusals:>7} {r.cap_violations:>9} "
            f"{r.completed:>4}/{r.jobs:<4}"
        )
    return "\n".join(lines)


def verdicts(rows: list[BenchRow], floors: dict[str, float]) -> list[str]:
    """Per workload and procure row, the goal met or missed; then a count per procure row."""
    out = []
    met_count = dict.fromkeys(("procure", PROCURE_MIN0), 0)
    workloads = list(dict.fromkeys(r.workload for r in rows))
    unreachable = 0
    for workload in workloads:
        by = {r.policy: r for r in rows if r.workload == workload}
        seed = by["seed-rule"]
        floor = floors[workload]
        reachable = 1 - floor / seed.cost_usd if seed.cost_usd else 0.0
        goal = (1 - GOAL) * seed.cost_usd
        unreachable += goal < floor
        for name in met_count:
            ours = by[name]
            saving = 1 - ours.cost_usd / seed.cost_usd if seed.cost_usd else 0.0
            met = saving >= GOAL and ours.wait_p95_s <= seed.wait_p95_s
            met_count[name] += met
            word = "cheaper" if saving >= 0 else "dearer"
            out.append(
                f"  [{'met' if met else 'MISSED'}] {workload}: {name} ${ours.cost_usd:.2f} vs "
                f"the seed's rule ${seed.cost_usd:.2f} ({abs(saving):.1%} {word}), p95 wait "
                f"{ours.wait_p95_s / 60:.1f} vs {seed.wait_p95_s / 60:.1f} min; work-only floor "
                f"${floor:.2f}: at most {reachable:.1%} cheaper is possible"
                + (
                    f", {GOAL:.0%} cheaper (${goal:.2f}) is {1 - goal / floor:.1%} under it"
                    if goal < floor
                    else ""
                )
            )
    out += [
        f"  {name}: goal met on {n} of {len(workloads)} workload(s); out of reach whatever the "
        f"policy (under the floor) on {unreachable}"
        for name, n in met_count.items()
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3", help="synthetic workload seeds")
    parser.add_argument(
        "--profile",
        choices=(*PROFILES, "all", "none"),
        default="all",
        help="synthetic profile(s) to run (none: only the --csv workloads)",
    )
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
    profiles = {"all": list(PROFILES), "none": []}.get(args.profile, [args.profile])
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    groups: dict[str, list[str]] = {}  # a table per profile, one for the CSV files
    workloads: list[tuple[str, list[JobSpec]]] = []
    for profile in profiles:
        for seed in seeds:
            name = f"{profile} {seed}"
            groups.setdefault(profile, []).append(name)
            workloads.append((name, synthetic(seed, **PROFILES[profile])))
    for path in args.csv:
        groups.setdefault("csv", []).append(path.stem[:12])
        workloads.append((path.stem[:12], load_csv(path)))
    floors = {name: work_floor_usd(jobs, settings("procure"), BOOT_S) for name, jobs in workloads}
    tasks = [
        (p, name, jobs, args.hours, args.target_wait) for name, jobs in workloads for p in POLICIES
    ]
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(one, tasks))
    for group, names in groups.items():
        mine = [r for r in rows if r.workload in names]
        params = PROFILES.get(group)
        if params is not None:
            shown = {**(synthetic.__kwdefaults__ or {}), **params}
            print(
                f"profile {group}: synthetic(seed, "
                + ", ".join(f"{k}={v:g}" for k, v in shown.items())
                + ")"
            )
        else:
            print("CSV workloads")
        print(table(mine, floors))
        print("\n".join(verdicts(mine, floors)))
        print()
    print(f"({len(rows)} runs in {time.monotonic() - started:.0f}s)")
    violations = sum(r.cap_violations for r in rows)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
