"""The clouds benchmark on a tiny configuration: every policy's jobs complete, the baselines are
what they claim to be, procure resumes from checkpoints and never overspends its budget."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import benchmark
from procure.sim.cloud_bench import (
    Config,
    JobCase,
    World,
    cases,
    cheapest,
    live,
    procure,
    run_policies,
    summarize,
)

TINY = Config(seeds=(0,), jobs=3)


def test_every_policy_completes_and_the_baselines_are_what_they_claim() -> None:
    outcomes = run_policies(TINY)
    assert {o.policy for o in outcomes} == {"procure", "on-demand", "spot-restart"}
    assert all(o.completed for o in outcomes)
    world = World(0, TINY)
    by_job = {c.index: c for c in cases(world)}
    for o in outcomes:
        if o.policy == "on-demand":  # (a): one launch of the cheapest on-demand offer, no loss
            case = by_job[o.job]
            offer = cheapest(world, case.start, False)
            running = case.start + world.boot_s[offer.provider]
            assert o.offers == [f"{offer.provider}/on-demand"] and o.preemptions == 0
            assert o.cost == world.billed(offer, case.start, running, running + 3600 * o.hours)
        if o.policy == "spot-restart":  # (b): bids only
            assert all(kind.endswith("/bid") for kind in o.offers)
    table = summarize(outcomes)
    assert table["on-demand"]["ratioToOnDemand"] == 1.0
    assert table["procure"]["withinBudget"] == TINY.jobs


def test_restart_from_scratch_loses_the_work_and_procure_resumes_from_a_checkpoint() -> None:
    world = World(0, Config(seeds=(0,), jobs=1, outbid_per_hour=2.0))
    case = JobCase(0, 0.0, 4.0, 10**9)
    bid = cheapest(world, 0.0, True)
    key = next(
        k
        for k in (str(i) for i in range(1000))
        if (life := live(world, bid, 0.0, 0.0, case, k)).outcome == "preempted"
        and life.running_hours > 0.5
    )
    scratch = live(world, bid, 0.0, 0.0, case, key, resume=False)
    resumed = live(world, bid, 0.0, 0.0, case, key)
    assert scratch.outcome == resumed.outcome == "preempted"
    assert scratch.cost == resumed.cost > 0  # the same draw under both (common random numbers)
    assert scratch.progress == 0.0
    step = world.config.checkpoint_every
    assert resumed.progress >= step
    assert abs(resumed.progress / step - round(resumed.progress / step)) < 1e-6
    assert resumed.progress <= resumed.running_hours / case.hours + 1e-9


def test_procure_stops_before_it_overspends_a_budget_too_small() -> None:
    world = World(0, TINY)
    case = cases(world)[0]
    poor = JobCase(case.index, case.start, case.hours, case.budget // 4)
    out = procure(world, poor, {})
    assert out.cost <= poor.budget
    assert not out.within_budget


def test_the_benchmark_prints_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    module = benchmark("clouds")
    assert module.main(["--seeds", "1", "--jobs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["policies"]) == {"procure", "on-demand", "spot-restart"}
    assert len(report["goals"]) == 4 and all(isinstance(g["met"], bool) for g in report["goals"])
    assert 0 < report["bounds"]["costFloorRatio"] < 1
