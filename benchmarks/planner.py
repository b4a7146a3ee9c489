"""The planner benchmark: procure against the seeds' policy, a greedy cheapest-with-failover
policy, the exact non-clairvoyant optimum (`procure.sim.optimum`) and the hindsight oracle, on
seeded simulated markets (calm, failure-heavy, deadline-tight).

    .venv/bin/python benchmarks/planner.py                # 1,000 jobs per scenario
    .venv/bin/python benchmarks/planner.py --jobs 200 --scenario failure-heavy --json

Each job's budget is 1.5 x its expected cost under the exact optimum (known before it runs).
Per scenario and policy it prints the cost per completed job (all money spent over the jobs
finished), per job, and per job with every unfinished run charged the optimum's expected cost
to finish it ("charged", the figure no policy can beat in expectation), its ratio to the bound
(the optimum's expected cost) and to the oracle, the completion rate, deadline misses and the
mean hours to complete; "optimum" is the optimal policy played in the simulator, a check on the
bound. Where deadlines are set, a lower bound on the expected deadline misses of any policy that
cannot see failures coming (`procure.sim.deadline_bound`: an exact programme over a relaxed
market, under each job's hard budget) beside procure's misses; --no-miss-bound skips it. Then
the goals on the failure-heavy market, met or missed, the one on deadline misses saying whether
the bound proves it out of reach. With --json, one object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from procure.sim.bench import BUDGET_FACTOR, Summary, job_budget, run_scenario, summarize
from procure.sim.deadline_bound import MissBound, job_bound, scenario_bound
from procure.sim.market import SCENARIOS, make_jobs

GOAL_BOUND = 1.02
GOAL_SAVING = 0.30
GOAL_COMPLETION = 0.99
HEADLINE = "failure-heavy"
# The expected misses above which the bound calls "no deadline missed" out of reach: any policy
# without foresight then misses none with at most exp(-0.5) = 61 % chance (the report gives the
# product of each job's 1 - bound, tighter), and expects more than half a miss.
OUT_OF_REACH = 0.5


@dataclass(frozen=True)
class Part:
    """One scenario's results: the summaries and the jobs procure missed (deadlines only)."""

    rows: list[Summary]
    missed: list[int]


def scenario_summaries(name: str, jobs: int, seed: int) -> Part:
    results = run_scenario(SCENARIOS[name], jobs, seed)
    rows = [summarize(name, policy, outcomes) for policy, outcomes in results.items()]
    return Part(rows, [o.job for o in results.get("procure", []) if o.missed_deadline])


def miss_bound(name: str, jobs: int, seed: int) -> MissBound | None:
    """The lower bound on the expected deadline misses of any non-clairvoyant policy on the
    scenario's jobs (None where it sets no deadline): run beside the policies."""
    market = SCENARIOS[name]
    if market.deadline_slack is None:
        return None
    cases = make_jobs(market, jobs, seed)
    return scenario_bound(market, cases, [job_budget(market, case) for case in cases])


def explained(bound: MissBound, jobs: int, seed: int, missed: list[int]) -> MissBound:
    """`bound` with the optimal path (vendor per interval if nothing fails) of each job
    procure missed."""
    market = SCENARIOS[bound.scenario]
    cases = make_jobs(market, jobs, seed)
    per_job = list(bound.per_job)
    for job in missed:
        if per_job[job].solved:
            case = cases[job]
            per_job[job] = job_bound(market, case, job_budget(market, case), explain=True)
    return replace(bound, per_job=tuple(per_job))


def _usd(micros: float) -> float:
    return round(micros / 1e6, 4)


def table(rows: list[Summary]) -> str:
    oracle = {r.scenario: r for r in rows if r.policy == "oracle"}
    head = (
        f"{'scenario':<15} {'policy':<8} {'$/completed':>11} {'$/job':>7} {'charged':>7} "
        f"{'× bound':>7} {'× oracle':>8} {'completed':>9} {'missed':>6} {'hours':>6} "
        f"{'failures':>8} {'payments':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        missed = str(r.deadline_misses) if r.deadline_jobs else "-"
        lines.append(
            f"{r.scenario:<15} {r.policy:<8} {r.cost_per_completed / 1e6:>11.3f} "
            f"{r.cost_per_job / 1e6:>7.3f} {r.charged_per_job / 1e6:>7.3f} "
            f"{r.charged / r.bound:>7.3f} "
            f"{r.charged / oracle[r.scenario].charged:>8.3f} {r.completion_rate:>9.1%} "
            f"{missed:>6} {r.mean_finish_hours:>6.2f} {r.failures:>8} {r.payments:>8}"
        )
    bounds = {r.scenario: r.bound_per_job for r in rows}
    lines.append("")
    for name, bound in bounds.items():
        note = " (deadline dropped: a lower bound)" if name == "deadline-tight" else ""
        lines.append(f"bound (exact optimum's expected $/job), {name}: {bound / 1e6:.3f}{note}")
    return "\n".join(lines)


def _down(x: float, places: int) -> float:
    """A lower bound as printed: rounded down, so that the figure stays a bound."""
    return math.floor(x * 10**places + 1e-9) / 10**places


def _up(x: float, places: int) -> float:
    return math.ceil(x * 10**places - 1e-9) / 10**places


def bound_lines(rows: list[Summary], bounds: list[MissBound]) -> str:
    ours = {r.scenario: r for r in rows if r.policy == "procure"}
    lines = []
    for b in bounds:
        missed = ours[b.scenario].deadline_misses if b.scenario in ours else None
        beside = "" if missed is None else f"; procure missed {missed}"
        lines.append(
            f"miss bound (any non-clairvoyant policy, expected), {b.scenario}: "
            f"{_down(b.expected, 2):.2f} of {b.jobs}{beside}; "
            f"P(no miss) <= {_up(b.none_missed_at_most, 3):.1%} "
            f"({b.solved} jobs solved, the rest provably add under {_up(b.skipped_at_most, 3)}; "
            f"{b.seconds:.0f}s)"
        )
    return "\n".join(lines)


def bound_verdict(bounds: list[MissBound]) -> str | None:
    """What the bound says about "no deadline missed" (None: no bound computed)."""
    if not bounds:
        return None
    total = sum(b.expected for b in bounds)
    if total > OUT_OF_REACH:
        chance = math.prod(b.none_missed_at_most for b in bounds)
        return (
            f"out of reach: any non-clairvoyant policy expects at least {_down(total, 2):.2f} "
            f"misses, and misses none with at most {_up(chance, 3):.1%} chance"
        )
    return f"not proved out of reach (bound {_down(total, 2):.2f} expected)"


def procure_misses(rows: list[Summary]) -> int:
    """procure's deadline misses over every scenario played: the headline market sets no
    deadline, so its own count is 0 whatever procure does where deadlines are set."""
    return sum(r.deadline_misses for r in rows if r.policy == "procure")


def goals(
    rows: list[Summary], bounds: list[MissBound] | None = None
) -> list[tuple[str, bool, str]]:
    heavy = {r.policy: r for r in rows if r.scenario == HEADLINE}
    if not {"oracle", "seeds", "procure"} <= set(heavy):
        return []
    ours, seeds = heavy["procure"], heavy["seeds"]
    misses = procure_misses(rows)
    ratio = ours.charged / ours.bound
    saving = 1 - ours.cost_per_completed / seeds.cost_per_completed
    verdict = bound_verdict(bounds or [])
    return [
        (f"procure <= {GOAL_BOUND:.2f} x the exact optimum", ratio <= GOAL_BOUND, f"{ratio:.3f}"),
        (f">= {GOAL_SAVING:.0%} cheaper than the seeds", saving >= GOAL_SAVING, f"{saving:.1%}"),
        (
            f">= {GOAL_COMPLETION:.0%} of jobs completed (budget {BUDGET_FACTOR} x expected)",
            ours.completion_rate >= GOAL_COMPLETION,
            f"{ours.completion_rate:.1%}",
        ),
        (
            "no deadline missed (every scenario)",
            misses == 0,
            str(misses) if verdict is None else f"{misses} ({verdict})",
        ),
    ]


def _row(r: Summary) -> dict[str, object]:
    return {
        "scenario": r.scenario,
        "policy": r.policy,
        "jobs": r.jobs,
        "usd_per_completed": _usd(r.cost_per_completed),
        "usd_per_job": _usd(r.cost_per_job),
        "charged_usd_per_job": _usd(r.charged_per_job),
        "bound_usd": _usd(r.bound_per_job),
        "completion": round(r.completion_rate, 4),
        "misses": r.deadline_misses,
        "mean_hours": round(r.mean_finish_hours, 3),
        "failures": r.failures,
        "payments": r.payments,
    }


def _bound(b: MissBound, missed: list[int]) -> dict[str, object]:
    late = []
    for job in missed:
        jb = b.of(job)
        if jb is not None:
            late.append(
                {
                    "job": job,
                    "hours": jb.hours,
                    "bound": _down(jb.miss, 6),
                    "first_vendor": jb.first_vendor,
                    "path": list(jb.path),
                }
            )
    return {
        "expected": _down(b.expected, 4),
        "jobs": b.jobs,
        "solved": b.solved,
        "none_missed_at_most": _up(b.none_missed_at_most, 4),
        "skipped_at_most": _up(b.skipped_at_most, 4),
        "seconds": round(b.seconds, 1),
        "procure_missed": late,
    }


def report(
    rows: list[Summary],
    jobs: int,
    seed: int,
    seconds: float,
    bounds: list[MissBound] | None = None,
    missed: dict[str, list[int]] | None = None,
) -> dict[str, object]:
    by = {(r.scenario, r.policy): r for r in rows}
    name = HEADLINE if (HEADLINE, "procure") in by else rows[0].scenario
    ours, oracle = by[(name, "procure")], by[(name, "oracle")]
    played = by.get((name, "optimum"))
    return {
        "scenario": name,
        "jobs": jobs,
        "seed": seed,
        "budget": f"{BUDGET_FACTOR} x the exact optimum's expected cost per job",
        "procure_usd": _usd(ours.charged_per_job),
        "procure_per_completed_usd": _usd(ours.cost_per_completed),
        "oracle_usd": _usd(oracle.cost_per_job),
        "bound_usd": _usd(ours.bound_per_job),
        "optimum_played_usd": _usd(played.charged_per_job) if played else None,
        "procure_x_bound": round(ours.charged / ours.bound, 4),
        "procure_x_oracle": round(ours.charged / oracle.charged, 4),
        "misses": procure_misses(rows),
        "completion": round(ours.completion_rate, 4),
        "goals": [{"goal": t, "met": m, "figure": f} for t, m, f in goals(rows, bounds)],
        "miss_bound": (
            None
            if not bounds
            else {b.scenario: _bound(b, (missed or {}).get(b.scenario, [])) for b in bounds}
        ),
        "miss_bound_out_of_reach": (
            None if not bounds else sum(b.expected for b in bounds) > OUT_OF_REACH
        ),
        "rows": [_row(r) for r in rows],
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="repeat; default: all"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="processes (one per scenario and bound)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--json-file", help="also write the JSON object to this file")
    parser.add_argument(
        "--no-miss-bound",
        action="store_true",
        help="skip the lower bound on deadline misses (about a minute per 1,000 jobs)",
    )
    args = parser.parse_args(argv)
    with_bound = not args.no_miss_bound
    names = args.scenario or list(SCENARIOS)
    began = time.monotonic()
    bounded = [n for n in names if with_bound and SCENARIOS[n].deadline_slack is not None]
    # The bounds first: the longest tasks, run beside the scenarios' policies.
    tasks = [(miss_bound, n) for n in bounded] + [(scenario_summaries, n) for n in names]
    if args.workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(task, n, args.jobs, args.seed) for task, n in tasks]
            done = [f.result() for f in futures]
    else:
        done = [task(n, args.jobs, args.seed) for task, n in tasks]
    parts = [p for p in done if isinstance(p, Part)]
    rows = [row for part in parts for row in part.rows]
    missed = {part.rows[0].scenario: part.missed for part in parts if part.rows}
    bounds = [
        explained(b, args.jobs, args.seed, missed.get(b.scenario, []))
        for b in done
        if isinstance(b, MissBound)
    ]
    seconds = time.monotonic() - began
    whole = report(rows, args.jobs, args.seed, seconds, bounds, missed)
    if args.json_file:
        with open(args.json_file, "w") as out:
            json.dump(whole, out, indent=1)
    if args.json:
        print(json.dumps(whole))
        return 0
    print(
        f"{args.jobs} jobs per scenario, seed {args.seed}, budget {BUDGET_FACTOR} x the exact "
        "optimum's expected cost"
    )
    print(table(rows))
    if bounds:
        print(bound_lines(rows, bounds))
    results = goals(rows, bounds)
    if results:
        print(f"\nGoals on the {HEADLINE} market:")
        for text, met, figure in results:
            print(f"  [{'met' if met else 'MISSED'}] {text}: {figure}")
    print(f"\n{seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
