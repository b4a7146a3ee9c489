"""The spot-trace benchmark: procure's planner against on-demand only, greedy, Uniform Progress
("Can't Be Late", NSDI '24) and the hindsight optimum on real spot-availability traces.

    .venv/bin/python benchmarks/spot.py --traces ../shared/traces/spot/aws-10-26-2022
    .venv/bin/python benchmarks/spot.py --traces a.json --deadlines 52 --starts 10 --json o.jsonl
    .venv/bin/python benchmarks/spot.py --traces ../shared/traces/spot/aws-10-26-2022 \
        --split us-west-2a,us-west-2b      # also the verdicts per group of traces (held out)

Per (deadline, overhead) it prints each policy's mean cost, score and deadline misses, and
whether procure scores at least Uniform Progress's with no miss; --json writes one line per
(trace, start, deadline, overhead, policy), in the format of the traces' README.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from procure.sim.spot_bench import Summary, json_lines, summarize, trace_rows
from procure.sim.traces import STARTS, load_trace, trace_paths


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _rows(args: tuple[Path, Path | None, list[float], list[float], int]) -> list[dict[str, object]]:
    path, root, deadlines, overheads, starts = args
    return trace_rows(load_trace(path, root), deadlines, overheads, starts)


def table(summaries: list[Summary]) -> str:
    head = f"{'D':>4} {'R':>5} {'policy':<17} {'jobs':>5} {'mean $':>8} {'score':>8} {'missed':>6}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(
            f"{s.deadline_hours:>4g} {s.overhead_hours:>5g} {s.policy:<17} {s.jobs:>5} "
            f"{s.mean_cost:>8.2f} {s.score:>8.1f} {s.misses:>6}"
        )
    return "\n".join(lines)


def verdicts(summaries: list[Summary]) -> list[str]:
    by = {(s.deadline_hours, s.overhead_hours, s.policy): s for s in summaries}
    out = []
    for d, r in sorted({(s.deadline_hours, s.overhead_hours) for s in summaries}):
        ours, up, best = (
            by[(d, r, "procure")],
            by[(d, r, "uniform-progress")],
            by[(d, r, "optimum")],
        )
        met = ours.misses == 0 and ours.score >= up.score
        gap = best.score - up.score
        closed = (ours.score - up.score) / gap if gap > 0 else 1.0
        out.append(
            f"  [{'met' if met else 'MISSED'}] D={d:g} R={r:g}: procure {ours.score:.1f} vs "
            f"Uniform Progress {up.score:.1f} (optimum {best.score:.1f}; {closed:.0%} of UP's gap "
            f"closed), {ours.misses} missed"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", nargs="+", type=Path, required=True, help="files or folders")
    parser.add_argument("--deadlines", type=_floats, default=[52.0, 70.0])
    parser.add_argument("--overheads", type=_floats, default=[0.02, 0.05, 0.1])
    parser.add_argument("--starts", type=int, default=STARTS, help="start ticks per trace")
    parser.add_argument("--json", type=Path, help="write the JSON lines here")
    parser.add_argument("--workers", type=int, default=2, help="processes (one trace each)")
    parser.add_argument(
        "--split",
        type=lambda text: [x for x in text.split(",") if x],
        default=[],
        help="comma-separated parts of trace names: the verdicts again for each group",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    tasks = [
        (path, root, args.deadlines, args.overheads, args.starts)
        for path, root in trace_paths(args.traces)
    ]
    if not tasks:
        parser.error("no trace files found")
    if args.workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            parts = list(pool.map(_rows, tasks))
    else:
        parts = [_rows(task) for task in tasks]
    rows = [row for part in parts for row in part]
    if args.json:
        args.json.write_text(json_lines(rows))
    summaries = summarize(rows)
    print(f"{len(tasks)} traces, up to {args.starts} starts each, task 48 h")
    print(table(summaries))
    print("\nprocure >= Uniform Progress's score with no deadline miss:")
    print("\n".join(verdicts(summaries)))
    for part in args.split:
        group = [row for row in rows if part in str(row["trace"])]
        if group:
            print(f"\ntraces named *{part}* only:")
            print("\n".join(verdicts(summarize(group))))
    print(f"\n{time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
