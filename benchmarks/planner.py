"""The planner benchmark: procure against the seeds' policy, a greedy cheapest-with-failover
policy and the hindsight oracle, on seeded simulated markets (calm, failure-heavy,
deadline-tight).

    .venv/bin/python benchmarks/planner.py                # 1,000 jobs per scenario
    .venv/bin/python benchmarks/planner.py --jobs 200 --seed 3 --workers 1

Per scenario and policy it prints the mean cost per completed job (all money spent over the jobs
finished) and its ratio to the oracle's, the completion rate, deadline misses and the mean hours
to complete; then the goals on the failure-heavy market, met or missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from procure.sim.bench import BUDGET_FACTOR, Summary, run_scenario, summarize
from procure.sim.market import SCENARIOS

GOAL_RATIO = 1.10
GOAL_SAVING = 0.30
GOAL_COMPLETION = 0.99


def scenario_summaries(name: str, jobs: int, seed: int) -> list[Summary]:
    results = run_scenario(SCENARIOS[name], jobs, seed)
    return [summarize(name, policy, outcomes) for policy, outcomes in results.items()]


def table(rows: list[Summary]) -> str:
    oracle = {r.scenario: r for r in rows if r.policy == "oracle"}
    head = (
        f"{'scenario':<15} {'policy':<8} {'$/completed':>11} {'× oracle':>8} {'completed':>9} "
        f"{'missed':>7} {'hours':>6} {'failures':>8} {'payments':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r.cost_per_completed / oracle[r.scenario].cost_per_completed
        missed = str(r.deadline_misses) if r.deadline_jobs else "-"
        lines.append(
            f"{r.scenario:<15} {r.policy:<8} {r.cost_per_completed / 1e6:>11.3f} {ratio:>8.3f} "
            f"{r.completion_rate:>9.1%} {missed:>7} {r.mean_finish_hours:>6.2f} "
            f"{r.failures:>8} {r.payments:>8}"
        )
    return "\n".join(lines)


def goals(rows: list[Summary]) -> list[tuple[str, bool, str]]:
    heavy = {r.policy: r for r in rows if r.scenario == "failure-heavy"}
    if not {"oracle", "seeds", "procure"} <= set(heavy):
        return []
    ours, oracle, seeds = heavy["procure"], heavy["oracle"], heavy["seeds"]
    ratio = ours.cost_per_completed / oracle.cost_per_completed
    saving = 1 - ours.cost_per_completed / seeds.cost_per_completed
    return [
        (f"procure <= {GOAL_RATIO:.2f} x oracle cost", ratio <= GOAL_RATIO, f"{ratio:.3f}"),
        (f">= {GOAL_SAVING:.0%} cheaper than the seeds", saving >= GOAL_SAVING, f"{saving:.1%}"),
        (
            f">= {GOAL_COMPLETION:.0%} of jobs completed (budget {BUDGET_FACTOR} x oracle)",
            ours.completion_rate >= GOAL_COMPLETION,
            f"{ours.completion_rate:.1%}",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeat; default: all"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (one per scenario)")
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    began = time.monotonic()
    if args.workers > 1 and len(names) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            parts = list(
                pool.map(
                    scenario_summaries, names, [args.jobs] * len(names), [args.seed] * len(names)
                )
            )
    else:
        parts = [scenario_summaries(name, args.jobs, args.seed) for name in names]
    rows = [row for part in parts for row in part]
    print(
        f"{args.jobs} jobs per scenario, seed {args.seed}, budget {BUDGET_FACTOR} x oracle's cost"
    )
    print(table(rows))
    results = goals(rows)
    if results:
        print("\nGoals on the failure-heavy market:")
        for text, met, figure in results:
            print(f"  [{'met' if met else 'MISSED'}] {text}: {figure}")
    print(f"\n{time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
