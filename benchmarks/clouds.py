"""The clouds benchmark: procure against (a) always the cheapest on-demand offer and (b) always
the cheapest interruptible offer restarting from scratch, on the three mock clouds' catalogues,
boot delays, billing and Vast.ai's outbid hazard, same seeds, in one run.

    .venv/bin/python benchmarks/clouds.py
    .venv/bin/python benchmarks/clouds.py --seeds 0,1,2,3 --jobs 50 --outbid-per-hour 0.5 --json

Prints cost, ratio to (a), completion within budget, median and p95 completion hours per policy,
then each goal met or missed and the floors no policy can beat (`procure.sim.cloud_bench`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from procure.sim.cloud_bench import POLICIES, Config, bounds, goals, run_policies, summarize

NAMES = {
    "procure": "procure",
    "on-demand": "(a) cheapest on-demand",
    "spot-restart": "(b) cheapest bid, restart",
}


def table(summary: dict[str, dict[str, object]]) -> str:
    head = (
        f"{'policy':<26} {'jobs':>4} {'cost $':>9} {'vs (a)':>7} {'in budget':>9} "
        f"{'median h':>8} {'p95 h':>7} {'launches':>8} {'preempted':>9}"
    )
    lines = [head, "-" * len(head)]
    for policy in POLICIES:
        s = summary[policy]
        lines.append(
            f"{NAMES[policy]:<26} {s['jobs']:>4} {s['costUsd']:>9.2f} "
            f"{s['ratioToOnDemand']:>7.1%} {s['withinBudget']:>4}/{s['jobs']:<4} "
            f"{s['medianHours']:>8.2f} {s['p95Hours']:>7.2f} {s['launches']:>8} "
            f"{s['preemptions']:>9}"
        )
    return "\n".join(lines)


def _finite(summary: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """JSON has no infinity: a quantile no job reached (unfinished jobs) is null."""
    return {
        policy: {k: None if v == math.inf else v for k, v in row.items()}
        for policy, row in summary.items()
    }


def _seeds(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seeds", type=_seeds, default=defaults.seeds, help="e.g. 0,1,2")
    parser.add_argument("--jobs", type=int, default=defaults.jobs, help="jobs per seed")
    parser.add_argument("--min-hours", type=float, default=defaults.min_hours)
    parser.add_argument("--max-hours", type=float, default=defaults.max_hours)
    parser.add_argument("--checkpoint-every", type=float, default=defaults.checkpoint_every)
    parser.add_argument("--budget-factor", type=float, default=defaults.budget_factor)
    parser.add_argument("--outbid-per-hour", type=float, default=defaults.outbid_per_hour)
    parser.add_argument("--boot-scale", type=float, default=defaults.boot_scale)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    config = Config(
        seeds=args.seeds,
        jobs=args.jobs,
        min_hours=args.min_hours,
        max_hours=args.max_hours,
        checkpoint_every=args.checkpoint_every,
        budget_factor=args.budget_factor,
        outbid_per_hour=args.outbid_per_hour,
        boot_scale=args.boot_scale,
    )
    began = time.monotonic()
    summary = summarize(run_policies(config))
    checked = goals(summary)
    floors = bounds(config)
    if args.json:
        print(
            json.dumps(
                {
                    "config": {**vars(config), "seeds": list(config.seeds)},
                    "policies": _finite(summary),
                    "goals": [{"goal": g, "met": met} for g, met in checked],
                    "bounds": floors,
                    "seconds": round(time.monotonic() - began, 1),
                },
                default=str,
                allow_nan=False,
            )
        )
        return 0
    print(
        f"{len(config.seeds)} seeds x {config.jobs} A100 jobs of {config.min_hours:g}-"
        f"{config.max_hours:g} h, checkpoint every {config.checkpoint_every:.0%}, budget "
        f"{config.budget_factor:g} x expected on-demand cost, Vast.ai outbid "
        f"{config.outbid_per_hour:g}/h, boot x{config.boot_scale:g}"
    )
    print(table(summary))
    print("\nGoals:")
    for goal, met in checked:
        print(f"  [{'met' if met else 'MISSED'}] {goal}")
    cost_missed = not checked[1][1]
    if cost_missed and floors["costFloorRatio"] > 0.75:
        print(f"  out of reach: the cost floor is {floors['costFloorRatio']:.1%} of (a) > 75 %")
    elif cost_missed:
        print(f"  within reach: the cost floor is {floors['costFloorRatio']:.1%} of (a)")
    if not checked[3][1] and floors["medianHoursFloorRatio"] > 1.3:
        print("  out of reach: the fastest possible median is over 1.3 x (a)'s")
    print(
        f"\nFloors: no policy pays less than {floors['costFloorRatio']:.1%} of (a) (every job "
        f"once on the cheapest bid, never preempted); none has a median under "
        f"{floors['medianHoursFloorRatio']:.2f} x (a)'s"
    )
    print(f"\n{time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
