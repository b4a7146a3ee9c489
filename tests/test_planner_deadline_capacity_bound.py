"""The miss bound meets the simulator's capacity at a job's first start (issue 20): a vendor
without capacity in the first quarter hour cannot be started before the next one, as
`JobCase.has_capacity` decides in the simulator; later starts still find capacity (a
relaxation). The bound stays below every policy played in the simulator."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from procure.models import usd_to_micros
from procure.sim.bench import job_budget, run_policy
from procure.sim.deadline_bound import COARSE, Resolution, job_bound, single_vendor_miss, solve
from procure.sim.market import DEADLINE_TIGHT, Failures, JobCase, Market, VendorSpec, make_jobs
from procure.sim.optimum import optimal_policy
from procure.sim.policies import GREEDY, PROCURE

FLAKY = VendorSpec("flaky", usd_to_micros("1.00"), 1.0, 0.9, 0.0, 0.05)
STEADY = VendorSpec("steady", usd_to_micros("3.00"), 0.1, 0.9, 0.0, 0.05)
GRID = Resolution(time_step=0.0025, piece_hours=0.005, max_rows=128, max_columns=512)


def _market(*vendors: VendorSpec, slack: float | None = None, cooldown: float = 0.0) -> Market:
    return Market("tiny", vendors, usd_to_micros("0.005"), slack, cooldown_hours=cooldown)


def _case(market: Market, index: int, hours: float, every: float, deadline: float) -> JobCase:
    return JobCase(
        index=index,
        hours=hours,
        checkpoint_every=every,
        deadline_hours=deadline,
        horizon_hours=32.0,
        failures={
            v.vendor_id: Failures(f"cap:{index}:{v.vendor_id}", v.hazard) for v in market.vendors
        },
        capacity_seed=index,
    )


def test_a_vendor_refusing_the_first_start_misses_a_deadline_too_close_to_wait_for() -> None:
    """Before the fix: the bound let every vendor start at once, so a vendor refusing a fifth
    of its starts changed nothing (0.181 here, where 0.345 is the least chance of a miss)."""
    # 0.2 h of work due 0.09 h after it could end: no time to wait a quarter hour for capacity,
    # so a refusal misses, and otherwise a failure during the work does.
    refusing = replace(FLAKY, refuse_rate=0.2)
    deadline = 0.05 + 0.2 + 0.04
    ready = solve(_market(FLAKY), 0.2, 0.5, deadline, usd_to_micros("10"), resolution=GRID)[0]
    assert ready == pytest.approx(1 - math.exp(-1.0 * 0.2), abs=1e-12)
    case = _case(_market(refusing), 0, 0.2, 0.5, deadline)
    bound = job_bound(_market(refusing), case, usd_to_micros("10"), skip_below=0.0, resolution=GRID)
    assert bound.miss == pytest.approx(0.2 + 0.8 * ready, abs=1e-12)


def test_when_the_best_vendor_refuses_the_bound_is_the_next_best_start() -> None:
    """Before the fix: the steady vendor refusing half its starts left the bound at its
    chance of a failure alone (0.020), as if it always had capacity, where 0.101 is right."""
    deadline = 0.05 + 0.2 + 0.04
    budget = usd_to_micros("10")
    both = _market(FLAKY, STEADY)
    # With capacity everywhere the steady vendor starts (as in the bound's own tests); where
    # it refuses, the flaky one does, which fails five times as often in the same work.
    steady_only = solve(both, 0.2, 0.5, deadline, budget, resolution=GRID)[0]
    flaky_only = solve(_market(FLAKY), 0.2, 0.5, deadline, budget, resolution=GRID)[0]
    refusing = _market(FLAKY, replace(STEADY, refuse_rate=0.5))
    case = _case(refusing, 0, 0.2, 0.5, deadline)
    bound = job_bound(refusing, case, budget, skip_below=0.0, resolution=GRID)
    assert bound.miss == pytest.approx(0.5 * steady_only + 0.5 * flaky_only, abs=1e-12)
    assert bound.first_vendor == "steady"  # the first vendor if every vendor has capacity


def test_no_policy_played_with_refusals_misses_less_often_than_the_bound() -> None:
    """Before the fix: the bound ignored the refusals that every policy here meets (the steady
    vendor refuses 40 % of starts) and stood at 0.035; with them it is 0.106, and procure, the
    best policy played here, misses 0.155."""
    market = _market(
        VendorSpec("cheap", usd_to_micros("1.00"), 0.5, 0.9, 0.1, 0.05),
        VendorSpec("sure", usd_to_micros("1.60"), 0.05, 0.99, 0.4, 0.05),
        slack=0.15,
        cooldown=300 / 3600,  # the agent's
    )
    jobs = [_case(market, i, 1.0, 1 / 3, 0.05 + 1.15) for i in range(200)]
    budgets = [job_budget(market, case) for case in jobs]
    bound = job_bound(market, jobs[0], budgets[0], skip_below=0.0)
    args = (market, 1.0, 1 / 3, 0.05 + 1.15, float(budgets[0]))
    assert bound.solved and bound.miss > 1.02 * solve(*args)[0]
    rates = []
    for policy in (PROCURE, GREEDY, optimal_policy(market)):
        rows = run_policy(policy, market, jobs, budgets)
        rate = sum(o.missed_deadline for o in rows) / len(rows)
        rates.append(rate)
        # Every job has the same bound; the rate is a mean of 200 draws: 3 standard errors.
        error = 3 * math.sqrt(max(rate * (1 - rate), bound.miss * (1 - bound.miss)) / len(rows))
        assert bound.miss <= rate + error, (policy.name, bound.miss, rate)
    assert min(rates) < 0.5  # the comparison is not with hopeless policies only


def test_a_skipped_job_reports_a_cap_that_covers_its_refusals() -> None:
    """Before the fix: a job skipped for its small single-vendor chance reported that chance
    without refusals (0.221 here) as the most it could add, below its bound with them (0.345)."""
    refusing = _market(replace(FLAKY, refuse_rate=0.2))
    deadline = 0.05 + 0.2 + 0.04
    budget = usd_to_micros("10")
    case = _case(refusing, 0, 0.2, 0.5, deadline)
    solved = job_bound(refusing, case, budget, skip_below=0.0, resolution=GRID)
    skipped = job_bound(refusing, case, budget, skip_below=1.0, resolution=GRID)
    assert not skipped.solved and skipped.miss == 0.0
    assert solved.miss <= skipped.cap
    # On the benchmark's own market too, from short jobs to long ones.
    cases = sorted(make_jobs(DEADLINE_TIGHT, 40, seed=8), key=lambda c: c.hours)[::8]
    for c in cases:
        assert c.deadline_hours is not None
        args = (DEADLINE_TIGHT, c.hours, c.checkpoint_every, c.deadline_hours)
        money = float(job_budget(DEADLINE_TIGHT, c))
        miss = solve(*args, money, resolution=COARSE, refusals=True)[0]
        assert miss <= single_vendor_miss(*args, money, refusals=True) + 1e-12, c
