"""The market simulator: the oracle bounds every policy (the exact optimum played in the
simulator among them), procure beats the seeds, runs replay."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procure.agent import planner as planner_module
from procure.models import usd_to_micros
from procure.sim.bench import run_scenario, summarize
from procure.sim.engine import registry, simulate
from procure.sim.market import CALM, FAILURE_HEAVY, SCENARIOS, Market, VendorSpec, make_jobs
from procure.sim.oracle import Unfinishable, oracle
from procure.sim.policies import POLICIES, PROCURE

EPS = 1e-9


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_oracle_costs_no_more_than_any_policy_that_finished_on_time(name: str) -> None:
    results = run_scenario(SCENARIOS[name], jobs=40, seed=11)
    best = {o.job: o for o in results.pop("oracle")}
    compared = 0
    for outcomes in results.values():
        for o in outcomes:
            if o.completed and not o.missed_deadline:
                assert best[o.job].cost <= o.cost, (o.policy, o.job)
                compared += 1
    assert compared > 40  # most jobs finish under at least two policies


def test_procure_beats_the_seeds_and_greedy_on_a_failure_heavy_market() -> None:
    results = run_scenario(FAILURE_HEAVY, jobs=120, seed=5, policies=POLICIES)
    s = {name: summarize("failure-heavy", name, rows) for name, rows in results.items()}
    assert s["procure"].cost_per_completed < 0.7 * s["seeds"].cost_per_completed
    assert s["procure"].cost_per_completed < s["greedy"].cost_per_completed
    assert s["procure"].completion_rate > s["seeds"].completion_rate
    assert s["procure"].cost_per_completed < 1.3 * s["oracle"].cost_per_completed


def test_same_seed_same_outcomes() -> None:
    first = run_scenario(CALM, jobs=25, seed=3, policies=POLICIES)
    assert run_scenario(CALM, jobs=25, seed=3, policies=POLICIES) == first
    assert run_scenario(CALM, jobs=25, seed=4, policies=POLICIES) != first


def test_sim_drives_the_agents_own_planner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = planner_module.plan_cost_aware

    def spy(ctx):  # type: ignore[no-untyped-def]
        calls.append(ctx.state.run.id)
        return real(ctx)

    monkeypatch.setattr(planner_module, "plan_cost_aware", spy)
    case = make_jobs(FAILURE_HEAVY, 1, seed=2)[0]
    simulate(PROCURE, FAILURE_HEAVY, case, usd_to_micros("100"), registry(FAILURE_HEAVY))
    assert calls and set(calls) == {"sim-0"}


def test_learning_moves_procure_off_a_vendor_that_lies_about_its_reliability() -> None:
    liar = VendorSpec("liar", usd_to_micros("1.00"), 1.5, 0.999, 0.0, 0.05)
    honest = VendorSpec("honest", usd_to_micros("1.20"), 0.001, 0.95, 0.0, 0.05)
    market = Market("liars", (liar, honest), payment_fee=usd_to_micros("0.005"))
    learned = registry(market)
    shares = []  # of each job's GPU-hours that ran on the liar
    for case in make_jobs(market, 30, seed=1):
        before = {k: v.gpu_hours for k, v in learned.items()}
        simulate(PROCURE, market, case, usd_to_micros("500"), learned)
        ran = {k: learned[k].gpu_hours - before[k] for k in learned}
        shares.append((ran["liar"], ran["liar"] + ran["honest"]))
    assert shares[0][0] > 0.5 * shares[0][1]  # believed at first
    late = shares[-15:]
    assert sum(liar for liar, _ in late) < 0.1 * sum(total for _, total in late)  # found out


vendor_specs = st.builds(
    VendorSpec,
    vendor_id=st.sampled_from(["a", "b", "c", "d", "e", "f"]),
    price_per_hour=st.integers(500_000, 3_000_000),
    hazard=st.floats(0.0, 1.5),
    advertised=st.floats(0.5, 0.999),
    refuse_rate=st.floats(0.0, 0.5),
    startup_hours=st.floats(0.0, 0.3),
)
markets = st.builds(
    Market,
    name=st.just("random"),
    vendors=st.lists(vendor_specs, min_size=1, max_size=5, unique_by=lambda v: v.vendor_id).map(
        tuple
    ),
    payment_fee=st.integers(0, 50_000),
    deadline_slack=st.none() | st.floats(0.0, 0.5),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market=markets, seed=st.integers(0, 10_000), factor=st.floats(0.3, 3.0))
def test_no_policy_ever_spends_more_than_its_budget(
    market: Market, seed: int, factor: float
) -> None:
    cases = [replace(c, horizon_hours=c.hours * 3 + 4) for c in make_jobs(market, 2, seed)]
    best = {}
    for case in cases:
        try:
            best[case.index] = oracle(market, case).cost
        except Unfinishable:
            best[case.index] = round(case.hours * 3_000_000)  # no one can finish it
    for policy in POLICIES:
        learned = registry(market)
        for case in cases:
            budget = max(1, round(best[case.index] * factor))
            outcome = simulate(policy, market, case, budget, learned)
            assert outcome.cost <= budget
            if outcome.completed and not outcome.missed_deadline:
                assert outcome.cost >= best[case.index]
