"""The spot benchmark's fitted worlds played in parts (so many workers can share many windows)
give the same windows and figures as one pass, and the verdict says on which side of the goal
the exact optimum's share lies and how surely."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmark_scripts import benchmark
from procure.sim.spot_bench import Summary, trace_rows
from procure.sim.spot_bound import ModelSummary, model_rows, summarize_model
from procure.sim.spot_mdp import fit, solve
from procure.sim.traces import Setting, Trace

TRACE = Trace("zone/t.json", 1800, tuple([True, True, False, True, False, False] * 30))
SMALL = Setting(deadline_hours=6.0, overhead_hours=0.1, task_hours=4.0)


def test_windows_played_in_parts_are_the_windows_of_one_pass() -> None:
    chain = fit(TRACE.available)
    progs = {SMALL: solve(chain, TRACE.gap_hours, SMALL)}
    whole = model_rows(TRACE, chain, progs, windows=6)
    parts = [row for skip in (0, 2, 4) for row in model_rows(TRACE, chain, progs, 2, skip=skip)]
    assert [x for r in parts for x in r.up] == list(whole[0].up)
    assert [x for r in parts for x in r.hindsight] == list(whole[0].hindsight)
    assert [x for r in parts for x in r.procure] == list(whole[0].procure)
    # Summed over the parts, the figures are the one pass's: the bound counted once per trace.
    [one], [split] = summarize_model(whole), summarize_model(parts)
    assert split.windows == one.windows == 6
    assert split.bound == pytest.approx(one.bound)
    assert split.closable == pytest.approx(one.closable)
    assert split.closable_se == pytest.approx(one.closable_se)
    assert split.procure == pytest.approx(one.procure)
    # A part with no starts plays the fitted world only (the benchmark's 48 h of work).
    hourly = Trace("zone/h.json", 3600, TRACE.available)
    rows, model = trace_rows(hourly, [52.0], [0.05], 0, model_windows=2, model_skip=4)
    _, [six] = trace_rows(hourly, [52.0], [0.05], 0, model_windows=6)
    assert rows == [] and [m.up for m in model] == [six.up[4:]]


def test_many_windows_become_tasks_of_one_chunk_each() -> None:
    spot = benchmark("spot")
    args = argparse.Namespace(
        deadlines=[52.0],
        overheads=[0.05],
        starts=30,
        model_windows=120,
        model_chunk=50,
        learned=False,
    )
    found = [(Path("a.json"), None), (Path("b.json"), None)]
    tasks = spot.tasks_for(found, args)
    # Each trace's first task plays its real windows and the first chunk; the rest only windows.
    assert [(t[0].name, t[4], t[5], t[7]) for t in tasks] == [
        ("a.json", 30, 50, 0),
        ("b.json", 30, 50, 0),
        ("a.json", 0, 50, 50),
        ("a.json", 0, 20, 100),
        ("b.json", 0, 50, 50),
        ("b.json", 0, 20, 100),
    ]
    args.model_windows = 20
    assert [(t[5], t[7]) for t in spot.tasks_for(found, args)] == [(20, 0), (20, 0)]


def _summaries() -> list[Summary]:
    costs = {"uniform-progress": 110.0, "procure": 104.0, "optimum": 100.0}
    return [Summary(52.0, 0.05, p, 30, c, 0, 0.0) for p, c in costs.items()]


def _world(closable: float, se: float) -> ModelSummary:
    return ModelSummary(52.0, 0.05, 1600, 101.0, 111.0, 100.0, 101.5, 0, closable, se, 0.85)


def test_the_verdict_states_the_side_of_the_goal_and_its_confidence() -> None:
    verdicts = benchmark("spot").verdicts
    below = "\n".join(verdicts(_summaries(), [_world(0.88, 0.005)]))
    assert "[out of reach in the fitted model]" in below
    assert "below 90% by 2.0 points, 4.0 standard errors" in below
    above = "\n".join(verdicts(_summaries(), [_world(0.91, 0.005)]))
    assert "[MISSED]" in above and "above 90% by 1.0 points, 2.0 standard errors" in above
    assert "97.7% one-sided confidence" in above
