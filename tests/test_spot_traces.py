"""The spot-trace market: the parser, the step accounting, the reference policies, the optimum,
the JSON lines, and the agent's own planner driven through trace-like vendors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from procure.agent import planner as planner_module
from procure.sim.spot_bench import POLICIES, case_rows, summarize
from procure.sim.spot_engine import play_planner
from procure.sim.spot_mdp import fit, solve
from procure.sim.spot_optimum import optimum
from procure.sim.spot_policies import StepPolicy, greedy, on_demand_only, play, uniform_progress
from procure.sim.traces import (
    Job,
    Mode,
    Setting,
    Trace,
    hold,
    load_trace,
    parse_trace,
    preempt_if_gone,
    start_ticks,
    trace_paths,
)

# A small setting: 4 h of work, half-hour steps.
GAP = 0.5
SMALL = Setting(deadline_hours=6.0, overhead_hours=0.1, task_hours=4.0)


def test_parser_takes_any_gap_and_counts_one_or_more_as_available(tmp_path: Path) -> None:
    trace = parse_trace('{"metadata": {"gap_seconds": 32}, "data": [0, 1, 4, 0, 2]}', "t.json")
    assert trace.gap_seconds == 32 and trace.gap_hours == pytest.approx(32 / 3600)
    assert trace.available == (False, True, True, False, True)
    folder = tmp_path / "zone"
    folder.mkdir()
    (folder / "a.json").write_text('{"metadata": {"gap_seconds": 600}, "data": [1, 0]}')
    [(path, root)] = trace_paths([folder])
    assert load_trace(path, root).name == "zone/a.json"
    with pytest.raises(ValueError):
        parse_trace('{"metadata": {"gap_seconds": 0}, "data": []}', "bad")


def test_start_ticks_leave_room_for_the_longest_window() -> None:
    trace = Trace("t", 3600, (True,) * 100)
    starts = start_ticks(trace, count=5, window_hours=70)
    assert starts == [0, 8, 15, 22, 30]
    assert start_ticks(Trace("t", 3600, (True,) * 50), count=5) == []


def test_a_preemption_keeps_progress_and_each_launch_pays_its_overhead() -> None:
    job = Job()
    hold(job, Mode.SPOT, SMALL, GAP)  # launch: 0.1 h overhead, 0.4 h of work
    assert job.done == pytest.approx(0.4) and job.cost == pytest.approx(0.5 * SMALL.spot_price)
    assert preempt_if_gone(job, available=False) and job.mode == Mode.NONE
    assert job.done == pytest.approx(0.4)  # kept
    hold(job, Mode.NONE, SMALL, GAP)  # waiting is free
    hold(job, Mode.ON_DEMAND, SMALL, GAP)  # a new launch, a new overhead
    assert job.done == pytest.approx(0.8) and job.launches == 2
    hold(job, Mode.ON_DEMAND, SMALL, GAP)  # no launch: the whole step is work
    assert job.done == pytest.approx(1.3)
    for _ in range(10):
        if job.finished is None:
            hold(job, Mode.ON_DEMAND, SMALL, GAP)
    # Pro rata in the last step: paid exactly for the time held.
    assert job.finished == pytest.approx(4.0 + 2 * 0.1 + 0.5)  # work, overheads, the wait
    assert job.cost == pytest.approx(0.5 * SMALL.spot_price + (4.0 - 0.4 + 0.1) * 3.06)


def test_the_planner_pays_per_step_and_its_cost_is_the_markets() -> None:
    ticks = [True] * 3 + [False] * 4 + [True] * 20
    played = play_planner(ticks, GAP, SMALL)
    assert played.account.finished is not None
    assert played.account.finished <= SMALL.deadline_hours
    assert played.payments >= 8  # one payment per step held, not one per job
    assert played.cost == pytest.approx(played.account.cost, abs=1e-3)


def test_greedy_and_uniform_progress_meet_the_deadline_through_the_safety_net() -> None:
    never = [False] * 20
    for make in (greedy, uniform_progress):
        job = play(never, GAP, SMALL, make())
        assert job.finished is not None and job.finished <= SMALL.deadline_hours + 1e-9
    # Greedy waits out all its slack first; Uniform Progress goes on-demand as soon as it falls
    # behind the line W·t/D (the second step).
    assert first_on_demand(never, greedy()) == 3  # a 4th half-hour wait: 2 h > 2 h - 0.1 h
    assert first_on_demand(never, uniform_progress()) == 1


def first_on_demand(ticks: list[bool], policy: StepPolicy) -> int:
    chosen: list[Mode] = []

    def spy(job: Job, here: bool, setting: Setting, gap: float) -> Mode:
        chosen.append(policy(job, here, setting, gap))
        return chosen[-1]

    play(ticks, GAP, SMALL, spy)
    return chosen.index(Mode.ON_DEMAND)


def test_uniform_progress_waits_when_ahead_and_returns_to_spot() -> None:
    ticks = [True] * 4 + [False] * 2 + [True] * 10
    choices: list[tuple[Mode, bool]] = []
    policy = uniform_progress()

    def spy(job: Job, here: bool, setting: Setting, gap: float) -> Mode:
        mode = policy(job, here, setting, gap)
        choices.append((mode, here))
        return mode

    job = play(ticks, GAP, SMALL, spy)
    assert choices[4] == (Mode.NONE, False)  # ahead of the line: waits for spot
    assert all(m == Mode.SPOT for m, here in choices if here)
    assert job.finished is not None and job.finished <= SMALL.deadline_hours


def test_the_optimum_bounds_every_policy() -> None:
    rng = random.Random(4)
    for _ in range(15):
        ticks = [rng.random() < 0.6 for _ in range(16)]
        best, finished = optimum(ticks, GAP, SMALL)
        assert finished <= SMALL.deadline_hours + 1e-9
        for make in (on_demand_only, greedy, uniform_progress):
            assert best <= play(ticks, GAP, SMALL, make()).cost + 1e-9
        assert best <= play_planner(ticks, GAP, SMALL).account.cost + 1e-9


def test_json_lines_follow_the_readme() -> None:
    trace = Trace("zone/t.json", 1800, tuple([True, False, True] * 8))
    prog = solve(fit(trace.available), trace.gap_hours, SMALL)
    rows = case_rows(trace, 0, SMALL, prog, learn=True)
    assert [r["policy"] for r in rows] == list(POLICIES)
    line = json.loads(json.dumps(rows[3]))
    assert set(line) == {
        "trace",
        "start_tick",
        "deadline_h",
        "overhead_h",
        "task_h",
        "policy",
        "cost",
        "finished_h",
    }
    assert line["trace"] == "zone/t.json" and line["task_h"] == 4.0
    summaries = summarize(rows)
    assert {s.policy for s in summaries} == set(POLICIES)
    assert next(s for s in summaries if s.policy == "on-demand").score == 0.0


def test_the_real_planner_drives_the_job_and_meets_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = planner_module.plan_cost_aware

    def spy(ctx):  # type: ignore[no-untyped-def]
        calls.append(ctx.hours_left)
        return real(ctx)

    monkeypatch.setattr(planner_module, "plan_cost_aware", spy)
    # 12 h of work in 14 h; spot comes and goes in 10-minute steps.
    setting = Setting(deadline_hours=14.0, overhead_hours=0.05, task_hours=12.0)
    rng = random.Random(7)
    ticks = [rng.random() < 0.7 for _ in range(90)]
    played = play_planner(ticks, 1 / 6, setting)
    assert calls  # the agent's own planner decided
    assert played.account.finished is not None and played.account.finished <= 14.0 + 1e-9
    od = play(ticks, 1 / 6, setting, on_demand_only())
    assert played.cost < od.cost


TEN_MINUTES = 1 / 6


def test_the_planner_waits_out_short_outages_instead_of_paying_on_demand_start_ups() -> None:
    # 12 h of work in 15 h; spot drops for one 10-minute step every 100 minutes. Waiting each
    # drop out costs 10 minutes of slack; going on-demand would cost two start-ups at $3.06/h.
    setting = Setting(deadline_hours=15.0, overhead_hours=0.1, task_hours=12.0)
    ticks = ([True] * 9 + [False]) * 10
    played = play_planner(ticks, TEN_MINUTES, setting)
    waited = play(ticks, TEN_MINUTES, setting, greedy())  # spot or wait, never on-demand here
    assert played.account.finished is not None and played.account.finished <= 15.0 + 1e-9
    assert played.cost == pytest.approx(waited.cost, abs=0.01)
    assert played.cost < 12.0 * 3.06 / 2


def test_a_long_outage_goes_on_demand_and_the_run_returns_to_spot_with_slack_to_spare() -> None:
    # 12 h of work in 14 h; spot is gone for the first 5 hours, then steady. Greedy waits out
    # its whole slack and is then stuck on on-demand; the planner keeps slack for later outages
    # (the registry's failure rate says there will be some), so it goes on-demand early and
    # moves back to spot when it returns.
    setting = Setting(deadline_hours=14.0, overhead_hours=0.05, task_hours=12.0)
    ticks = [False] * 30 + [True] * 60
    played = play_planner(ticks, TEN_MINUTES, setting)
    stuck = play(ticks, TEN_MINUTES, setting, greedy())
    assert played.account.finished is not None and played.account.finished <= 14.0 + 1e-9
    assert played.account.launches == 2  # on-demand, then spot
    assert played.cost < stuck.cost - 5.0


def test_off_on_demand_only_once_spot_has_stayed_up_when_slack_is_short() -> None:
    # A tight deadline (slack cannot pay every expected outage's restarts) and spot that comes
    # back for single 10-minute blips: each would cost two start-ups for a few minutes of work,
    # so the planner stays on on-demand through them and takes spot once it stays up.
    setting = Setting(deadline_hours=24.4, overhead_hours=0.1, task_hours=24.0)
    ticks = ([False] * 5 + [True]) * 6 + [True] * 150
    played = play_planner(ticks, TEN_MINUTES, setting)
    assert played.account.finished is not None and played.account.finished <= 24.4 + 1e-9
    assert played.account.launches == 2  # on-demand through the blips, then spot for good
    assert played.cost < 24 * 3.06 / 2
