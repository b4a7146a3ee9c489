"""The simulator credits only work done: adversarial policies (tiny jobs, waiting for the
horizon, abandoning dear jobs) pay for what they do and none beats the exact optimum."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

from procure.agent.context import PlanContext
from procure.models import Action, usd_to_micros
from procure.sim.bench import job_budget, run_policy, summarize
from procure.sim.engine import registry, simulate
from procure.sim.market import FAILURE_HEAVY, Failures, Market, VendorSpec, make_jobs
from procure.sim.optimum import best_money, money, optimal_policy, plan
from procure.sim.policies import Policy

SOLID = VendorSpec("solid", usd_to_micros("1.00"), 0.0, 0.99, 0.0, 0.05)
FEE = usd_to_micros("0.005")


def _start(ctx: PlanContext, hours: float, cheapest: bool = True) -> Action:
    ready = [v for v in ctx.vendors if not ctx.cooling_down(v)]
    if not ready:
        return Action(action="wait", reason="all cooling")
    vendor = min(ready, key=lambda v: (v.base_price_per_hour, v.vendor_id))
    return Action(
        action="start_job",
        vendor_id=vendor.vendor_id,
        hours=min(hours, ctx.remaining_hours),
        gpu_type=ctx.state.run.job_spec.gpu_type,
        reason="adversary",
    )


def tiny(hours: float) -> Policy:
    async def planner(ctx: PlanContext) -> Action:
        return _start(ctx, hours)

    return Policy(f"tiny-{hours}", planner, resume=True, reconsider=None)


async def _wait_for_horizon(ctx: PlanContext) -> Action:
    spec = ctx.state.run.job_spec
    horizon = spec.hours * 8 + 24  # the market's horizon: HORIZON_FACTOR x hours + a day
    elapsed = ctx.now - ctx.state.run.created_at
    if elapsed.total_seconds() / 3600 < horizon - 0.5:
        return Action(action="wait", reason="waiting for failures to stop")
    return _start(ctx, ctx.remaining_hours)


async def _abandon_dear(ctx: PlanContext) -> Action:
    spent = ctx.state.run.budget_total - ctx.available
    if ctx.state.run.job_spec.hours > 4 or (spent > 0 and ctx.resume_progress == 0):
        return Action(action="abort", reason="too dear")
    return _start(ctx, ctx.remaining_hours)


WAITER = Policy("waiter", _wait_for_horizon, resume=True, reconsider=None)
QUITTER = Policy("quitter", _abandon_dear, resume=True, reconsider=None)


def test_a_job_shorter_than_the_work_leaves_the_run_at_its_checkpoint() -> None:
    market = Market("solid", (SOLID,), payment_fee=FEE)
    case = replace(make_jobs(market, 1, seed=1)[0], hours=2.0, checkpoint_every=0.25)
    budget = usd_to_micros("50")
    # Shorter than a checkpoint interval: no job ever saves progress, so the run never ends.
    crumbs = simulate(tiny(0.1), market, case, budget, registry(market))
    assert not crumbs.completed and crumbs.progress == 0.0
    assert crumbs.payments > 20
    assert crumbs.cost == crumbs.payments * (usd_to_micros("0.10") + FEE)
    # One interval at a time: four jobs, each paid in full, and the fourth completes the run.
    steps = simulate(tiny(0.5), market, case, budget, registry(market))
    assert steps.completed and steps.progress == 1.0
    assert steps.payments == 4
    assert steps.cost == 4 * (usd_to_micros("0.50") + FEE)


def test_failures_keep_coming_past_the_horizon() -> None:
    case = make_jobs(FAILURE_HEAVY, 1, seed=3)[0]
    late = case.horizon_hours + 100
    for v in FAILURE_HEAVY.vendors:
        assert case.failures[v.vendor_id].after(late) < math.inf
    # The same stream, whatever order it is asked in.
    a, b = Failures("s", 0.35), Failures("s", 0.35)
    a.after(500.0)
    assert [b.after(t) for t in (1.0, 300.0)] == [a.after(t) for t in (1.0, 300.0)]
    assert b.upto(500.0) == a.upto(500.0)


def test_budgets_do_not_depend_on_the_failures_drawn() -> None:
    case = make_jobs(FAILURE_HEAVY, 1, seed=4)[0]
    calm = {v.vendor_id: Failures("none", 0.0) for v in FAILURE_HEAVY.vendors}
    assert job_budget(FAILURE_HEAVY, case) == job_budget(
        FAILURE_HEAVY, replace(case, failures=calm)
    )
    expected = plan(FAILURE_HEAVY, case.hours, case.checkpoint_every).values[0]
    assert job_budget(FAILURE_HEAVY, case) == math.ceil(1.5 * expected)


def test_no_adversary_beats_the_exact_optimum_and_each_pays_for_what_it_did() -> None:
    cases = make_jobs(FAILURE_HEAVY, 24, seed=9)
    budgets = [job_budget(FAILURE_HEAVY, c) for c in cases]
    for policy in (tiny(0.05), WAITER, QUITTER):
        rows = run_policy(policy, FAILURE_HEAVY, cases, budgets)
        s = summarize("failure-heavy", policy.name, rows)
        assert s.charged >= s.bound, policy.name
        for o in rows:
            assert o.cost <= o.budget
            if not o.completed:  # charged what the optimum needs to finish from its checkpoint
                assert o.owed > 0 and o.owed <= o.expected + 1e-6
        if policy is WAITER:  # waiting for the horizon buys no failure-free vendor
            assert s.failures > 0 and s.completed > 0
        if policy is QUITTER:  # money per completed job flatters it; charged, it loses
            assert s.completed < s.jobs
            assert s.cost_per_completed < s.bound_per_job < s.charged_per_job
        if policy.name.startswith("tiny"):
            assert s.completed == 0 and s.spent > 0


def test_the_optimal_policy_played_in_the_simulator_costs_what_the_bound_says() -> None:
    cases = make_jobs(FAILURE_HEAVY, 40, seed=12)
    rows = run_policy(optimal_policy(FAILURE_HEAVY), FAILURE_HEAVY, cases, [10**10] * len(cases))
    assert all(o.completed for o in rows)
    gaps = [o.cost - o.expected for o in rows]
    error = statistics.stdev(gaps) / math.sqrt(len(gaps))
    assert abs(statistics.mean(gaps)) < 3 * error


def test_the_slice_search_finds_the_least_money() -> None:
    for v in FAILURE_HEAVY.vendors:
        for h in (0.2, 1.3, 6.0):
            best, _ = best_money(v, FEE, h)
            grid = min(money(v, FEE, h * i / 4000, h) for i in range(1, 4001))
            assert best <= grid + 1e-6


def test_the_dynamic_programme_matches_brute_force_over_every_job_plan() -> None:
    # Two vendors, four intervals: every sequence of jobs from every checkpoint, by recursion.
    market = Market(
        "two",
        (
            VendorSpec("flaky", usd_to_micros("1.00"), 0.6, 0.9, 0.0, 0.1),
            VendorSpec("steady", usd_to_micros("1.60"), 0.05, 0.9, 0.0, 0.05),
        ),
        payment_fee=usd_to_micros("0.02"),
    )
    p = plan(market, 2.0, 0.25)
    pos, n = p.positions, len(p.positions) - 1
    values = [0.0] * (n + 1)
    for m in range(n - 1, -1, -1):
        best = math.inf
        for v in market.vendors:
            for d in range(1, n - m + 1):
                cost, _ = best_money(v, float(market.payment_fee), pos[m + d] - pos[m])
                survive = [
                    math.exp(-v.hazard * (v.startup_hours + pos[m + j] - pos[m]))
                    for j in range(d + 1)
                ]
                start = math.exp(-v.hazard * v.startup_hours)
                fail = [1 - start] + [survive[j - 1] - survive[j] for j in range(1, d + 1)]
                # fail[0]: start-up, fail[j]: interval j -> checkpoint m + j - 1
                rest = sum(fail[j] * values[m + j - 1] for j in range(2, d + 1))
                value = (cost + rest + survive[d] * values[m + d]) / (1 - fail[0] - fail[1])
                best = min(best, value)
        values[m] = best
    assert all(abs(a - b) < 1e-6 * max(1.0, b) for a, b in zip(values, p.values, strict=True))
