"""The spot-trace benchmark: every policy on the same (trace, start, deadline, overhead) cases,
as the README's JSON lines, and their summary per (deadline, overhead).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from procure.sim.spot_bound import (
    LEARNED,
    STATS_OPTIMAL,
    ModelRow,
    learned,
    model_rows,
    stats_optimal,
)
from procure.sim.spot_engine import play_planner
from procure.sim.spot_mdp import Programme, fit, solvable, solve
from procure.sim.spot_optimum import optimum
from procure.sim.spot_policies import StepPolicy, greedy, on_demand_only, play, uniform_progress
from procure.sim.traces import EPS, Setting, Trace, on_demand_cost, score, start_ticks, window

POLICIES = (
    "on-demand",
    "greedy",
    "uniform-progress",
    "procure",
    STATS_OPTIMAL,
    LEARNED,
    "optimum",
)
STEP_POLICIES: dict[str, Callable[[], StepPolicy]] = {
    "on-demand": on_demand_only,
    "greedy": greedy,
    "uniform-progress": uniform_progress,
}


def case_rows(
    trace: Trace,
    start: int,
    setting: Setting,
    programme: Programme | None = None,
    learn: bool = False,
) -> list[dict[str, object]]:
    """One JSON-lines row per policy for a job started at `start` under `setting` (the
    stats-optimal row where the trace's chain's `programme` is given; the learned row with
    `learn`)."""
    ticks = window(trace, start, setting)
    gap = trace.gap_hours
    results: dict[str, tuple[float, float | None]] = {}
    for name, make in STEP_POLICIES.items():
        job = play(ticks, gap, setting, make())
        results[name] = (job.cost, job.finished)
    played = play_planner(ticks, gap, setting)
    results["procure"] = (played.cost, played.account.finished)
    if programme is not None:
        results[STATS_OPTIMAL] = stats_optimal(ticks, gap, setting, programme)
    if learn:
        results[LEARNED] = learned(trace, start, ticks, setting) or results["procure"]
    results["optimum"] = optimum(ticks, gap, setting)
    return [
        {
            "trace": trace.name,
            "start_tick": start,
            "deadline_h": setting.deadline_hours,
            "overhead_h": setting.overhead_hours,
            "task_h": setting.task_hours,
            "policy": name,
            "cost": round(cost, 4),
            "finished_h": None if finished is None else round(finished, 4),
        }
        for name, (cost, finished) in results.items()
    ]


def trace_rows(
    trace: Trace,
    deadlines: Sequence[float],
    overheads: Sequence[float],
    starts: int,
    model_windows: int = 0,
    learn: bool = False,
    model_skip: int = 0,
) -> tuple[list[dict[str, object]], list[ModelRow]]:
    """Every policy on every start and setting of the trace, and (with `model_windows`) the
    same in the world of the trace's fitted chain, on its windows after the first `model_skip`
    (starts 0: the fitted world only). One setting's programme at a time: the longest
    deadline's is a few hundred MB."""
    chain = fit(trace.available)
    rows: list[dict[str, object]] = []
    model: list[ModelRow] = []
    for d in deadlines:
        for r in overheads:
            setting = Setting(d, r)
            prog = (
                solve(chain, trace.gap_hours, setting)
                if solvable(setting, trace.gap_hours)
                else None
            )
            rows += [
                row
                for start in start_ticks(trace, starts)
                for row in case_rows(trace, start, setting, prog, learn)
            ]
            if prog is not None and model_windows > 0:
                model += model_rows(trace, chain, {setting: prog}, model_windows, skip=model_skip)
    return rows, model


@dataclass(frozen=True)
class Summary:
    deadline_hours: float
    overhead_hours: float
    policy: str
    jobs: int
    mean_cost: float
    misses: int
    score: float


def summarize(rows: Iterable[dict[str, object]]) -> list[Summary]:
    """Mean cost, deadline misses and score per (deadline, overhead, policy)."""
    groups: dict[tuple[float, float, str], list[dict[str, object]]] = {}
    for row in rows:
        key = (float(row["deadline_h"]), float(row["overhead_h"]), str(row["policy"]))  # type: ignore[arg-type]
        groups.setdefault(key, []).append(row)
    out = []
    for (d, r, policy), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], POLICIES.index(kv[0][2]))
    ):
        setting = Setting(d, r, task_hours=float(group[0]["task_h"]))  # type: ignore[arg-type]
        mean = sum(float(g["cost"]) for g in group) / len(group)  # type: ignore[arg-type]
        misses = sum(
            1
            for g in group
            if g["finished_h"] is None or float(g["finished_h"]) > d + EPS  # type: ignore[arg-type]
        )
        out.append(
            Summary(
                d,
                r,
                policy,
                len(group),
                mean,
                misses,
                score(mean, on_demand_cost(setting), setting, misses),
            )
        )
    return out


def json_lines(rows: Iterable[dict[str, object]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
