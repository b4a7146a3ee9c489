"""The planner benchmark: every policy and the oracle on the same seeded jobs, per scenario.

Each job's budget is `budget_factor` times the oracle's cost for it, so a policy that wastes
money runs out of it. Policies learn vendor outcomes across the jobs of a scenario, as the agent
does across runs; each policy starts from the registry alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from procure.sim.engine import Outcome, registry, simulate
from procure.sim.market import JobCase, Market, make_jobs
from procure.sim.oracle import OracleResult, oracle
from procure.sim.policies import POLICIES, Policy

BUDGET_FACTOR = 1.5


@dataclass(frozen=True)
class Summary:
    scenario: str
    policy: str
    jobs: int
    completed: int
    spent: int  # micro-USD over all jobs, finished or not
    deadline_jobs: int
    deadline_misses: int
    mean_finish_hours: float
    failures: int
    payments: int

    @property
    def completion_rate(self) -> float:
        return self.completed / self.jobs if self.jobs else 0.0

    @property
    def cost_per_completed(self) -> float:
        """Micro-USD per completed job: all the money spent, over the jobs it finished."""
        return self.spent / self.completed if self.completed else math.inf


def run_policy(
    policy: Policy, market: Market, cases: Sequence[JobCase], budget_of: Sequence[int]
) -> list[Outcome]:
    learned = registry(market)
    return [
        simulate(policy, market, case, budget, learned)
        for case, budget in zip(cases, budget_of, strict=True)
    ]


def summarize(scenario: str, policy: str, outcomes: Iterable[Outcome]) -> Summary:
    rows = list(outcomes)
    done = [o for o in rows if o.completed]
    return Summary(
        scenario=scenario,
        policy=policy,
        jobs=len(rows),
        completed=len(done),
        spent=sum(o.cost for o in rows),
        deadline_jobs=sum(1 for o in rows if o.has_deadline),
        deadline_misses=sum(1 for o in rows if o.missed_deadline),
        mean_finish_hours=(
            sum(o.finish_hours or 0.0 for o in done) / len(done) if done else math.nan
        ),
        failures=sum(o.failures for o in rows),
        payments=sum(o.payments for o in rows),
    )


def oracle_outcomes(cases: Sequence[JobCase], results: Sequence[OracleResult]) -> list[Outcome]:
    return [
        Outcome(
            policy="oracle",
            job=case.index,
            completed=True,
            cost=r.cost,
            budget=r.cost,
            finish_hours=r.finish_hours,
            has_deadline=case.deadline_hours is not None,
            missed_deadline=case.deadline_hours is not None and not r.on_time,
            payments=r.segments,
            failures=0,
            max_committed=r.cost,
        )
        for case, r in zip(cases, results, strict=True)
    ]


def run_scenario(
    market: Market,
    jobs: int,
    seed: int,
    policies: Sequence[Policy] = POLICIES,
    budget_factor: float = BUDGET_FACTOR,
) -> dict[str, list[Outcome]]:
    """Outcomes per policy name (the oracle's under "oracle") on `jobs` seeded jobs."""
    cases = make_jobs(market, jobs, seed)
    best = [oracle(market, case) for case in cases]
    budget_of = [math.ceil(r.cost * budget_factor) for r in best]
    results = {"oracle": oracle_outcomes(cases, best)}
    for policy in policies:
        results[policy.name] = run_policy(policy, market, cases, budget_of)
    return results
