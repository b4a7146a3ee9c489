"""The planner benchmark: every policy, the oracle and the exact optimum on the same seeded jobs.

Each job's budget is `budget_factor` times its expected cost under the exact non-clairvoyant
optimum (`optimum.py`: the vendors' true prices, hazards, start-ups and fee; no deadline), so it
depends on the job's size and checkpoints only, never on the failures drawn. Policies learn
vendor outcomes across the jobs of a scenario, as the agent does across runs; each policy starts
from the registry alone. Costs are reported per completed job (all money over the jobs
finished), per job, and per job with every unfinished run charged what the optimum expects to
pay to finish it from the checkpoint it reached: no policy can beat the optimum on that last
figure in expectation, however it picks or abandons its jobs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from procure.agent.context import StartupsSeen
from procure.sim.engine import Outcome, registry, simulate
from procure.sim.market import JobCase, Market, make_jobs
from procure.sim.optimum import expected_cost, optimal_policy
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
    charged: float  # spent, plus the optimum's expected cost to finish every unfinished run
    bound: float  # the exact optimum's expected cost, summed over the jobs
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

    @property
    def cost_per_job(self) -> float:
        return self.spent / self.jobs if self.jobs else math.nan

    @property
    def charged_per_job(self) -> float:
        return self.charged / self.jobs if self.jobs else math.nan

    @property
    def bound_per_job(self) -> float:
        return self.bound / self.jobs if self.jobs else math.nan


def job_budget(market: Market, case: JobCase, factor: float = BUDGET_FACTOR) -> int:
    """`factor` times the job's expected cost under the exact optimum: known before it runs."""
    return math.ceil(factor * expected_cost(market, case.hours, case.checkpoint_every, 0.0))


def charge_unfinished(
    market: Market, cases: Sequence[JobCase], rows: list[Outcome]
) -> list[Outcome]:
    """Each outcome with what the optimum expects to pay from its start and from where it ended."""
    out = []
    for case, o in zip(cases, rows, strict=True):
        owed = (
            0.0
            if o.completed
            else expected_cost(market, case.hours, case.checkpoint_every, o.progress)
        )
        start = expected_cost(market, case.hours, case.checkpoint_every, 0.0)
        out.append(replace(o, owed=owed, expected=start))
    return out


def run_policy(
    policy: Policy, market: Market, cases: Sequence[JobCase], budget_of: Sequence[int]
) -> list[Outcome]:
    learned = registry(market)
    startups: dict[str, StartupsSeen] = {}  # seen across the jobs, as the agent's store keeps
    rows = [
        simulate(policy, market, case, budget, learned, startups)
        for case, budget in zip(cases, budget_of, strict=True)
    ]
    return charge_unfinished(market, cases, rows)


def summarize(scenario: str, policy: str, outcomes: Iterable[Outcome]) -> Summary:
    rows = list(outcomes)
    done = [o for o in rows if o.completed]
    return Summary(
        scenario=scenario,
        policy=policy,
        jobs=len(rows),
        completed=len(done),
        spent=sum(o.cost for o in rows),
        charged=sum(o.cost + o.owed for o in rows),
        bound=sum(o.expected for o in rows),
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
            progress=1.0,
        )
        for case, r in zip(cases, results, strict=True)
    ]


def run_scenario(
    market: Market,
    jobs: int,
    seed: int,
    policies: Sequence[Policy] | None = None,
    budget_factor: float = BUDGET_FACTOR,
) -> dict[str, list[Outcome]]:
    """Outcomes per policy name (the oracle's under "oracle") on `jobs` seeded jobs; by default
    the seeds', greedy, procure and the optimal policy played in the simulator ("optimum")."""
    cases = make_jobs(market, jobs, seed)
    budget_of = [job_budget(market, case, budget_factor) for case in cases]
    best = [oracle(market, case) for case in cases]
    results = {"oracle": charge_unfinished(market, cases, oracle_outcomes(cases, best))}
    for policy in (*POLICIES, optimal_policy(market)) if policies is None else policies:
        results[policy.name] = run_policy(policy, market, cases, budget_of)
    return results
