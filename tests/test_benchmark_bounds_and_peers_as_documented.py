"""The benchmarks issue 20 is judged on: every bound is a bound for what the simulators let a
policy do (the planner's optimum renews as the paid time runs out), every peer is as documented
(cluster-autoscaler's delay after a scale-up, Navarch's one cooldown), every verdict is what its
own numbers say (deadline misses counted where deadlines are set)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

from benchmark_scripts import benchmark
from procure.agent.context import PlanContext
from procure.agent.planner import Reconsider
from procure.agent.slices import paid_hours
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.policy import PROVISION, Proposal
from procure.models import Job
from procure.sim.bench import Summary as PlannerSummary
from procure.sim.bench import run_policy
from procure.sim.fleet_peers import ClusterAutoscaler
from procure.sim.fleet_world import BASE, REGIONS, Sim, World
from procure.sim.market import FAILURE_HEAVY, Market, make_jobs
from procure.sim.optimum import money, optimal_policy, plan
from procure.sim.policies import Policy

NO_BUDGET = 10**10
ROOT = Path(__file__).resolve().parents[1]


def _last_moment(market: Market) -> Reconsider:
    """A reconsider that lets the renewal point pass and buys the next slice when the paid time
    runs out (the simulator's tick asks again then): a vendor that dies in between is not paid."""
    startup = {v.vendor_id: v.startup_hours for v in market.vendors}

    def reconsider(ctx: PlanContext, job: Job, until: float) -> str | None:
        paid = paid_hours(job, ctx.state.payments)
        ends = job.created_at + timedelta(hours=startup[job.vendor_id] + paid)
        return "not yet" if ctx.now < ends - timedelta(seconds=1) else None

    return reconsider


def _expected_renewing_at_the_end(market: Market, hours: float, every: float) -> float:
    """The exact expected cost of the bound's own plan (its vendors, jobs and slices from every
    checkpoint) when each slice after the first is bought as the paid time runs out."""
    p = plan(market, hours, every)
    specs = {v.vendor_id: v for v in market.vendors}
    n = len(p.positions) - 1
    values = [0.0] * (n + 1)
    for m in range(n - 1, -1, -1):
        step = p.steps[m]
        v = specs[step.vendor_id]
        h = p.positions[m + step.intervals] - p.positions[m]
        fee = float(market.payment_fee)
        cost = fee + v.price_per_hour * h
        if step.slice_hours is not None:
            cost = money(v, fee, step.slice_hours, h, rho=0.0)
        survive = [
            math.exp(-v.hazard * (v.startup_hours + p.positions[m + j] - p.positions[m]))
            for j in range(step.intervals + 1)
        ]
        stay = 1 - survive[1]  # a failure in the start-up or the first interval: back to m
        rest = sum(
            (survive[j - 1] - survive[j]) * values[m + j - 1] for j in range(2, step.intervals + 1)
        )
        values[m] = (cost + rest + survive[-1] * values[m + step.intervals]) / (1 - stay)
    return values[0]


def test_no_policy_beats_the_exact_optimum_by_renewing_as_its_paid_time_runs_out() -> None:
    """Before the fix: the bound priced every renewal as bought when a tenth of the slice was
    left, but the simulator lets a policy buy it as the paid time runs out; the bound's own plan,
    renewed then, cost less than the bound (0.5 % on the failure-heavy market)."""
    market = FAILURE_HEAVY
    cases = make_jobs(market, 40, seed=12)
    planner = optimal_policy(market).planner
    early = Policy("early", planner, resume=True, reconsider=None)
    late = Policy("late", planner, resume=True, reconsider=_last_moment(market))
    budgets = [NO_BUDGET] * len(cases)
    at_point = run_policy(early, market, cases, budgets)
    at_end = run_policy(late, market, cases, budgets)
    # The simulator plays it: the same jobs, never dearer, and a vendor that fails between the
    # renewal point and the end of its paid time is not paid its next slice.
    assert all(o.completed for o in at_end)
    assert all(b.cost <= a.cost for a, b in zip(at_point, at_end, strict=True))
    assert any(b.cost < a.cost for a, b in zip(at_point, at_end, strict=True))
    # And in expectation it is no better than the bound says the best policy can do.
    for case in cases[:12]:
        bound = plan(market, case.hours, case.checkpoint_every).values[0]
        played = _expected_renewing_at_the_end(market, case.hours, case.checkpoint_every)
        assert bound <= played * (1 + 1e-9), (case.index, bound, played)


def _launch(sim: Sim, type_name: str) -> None:
    sim.act(Proposal(PROVISION, None, "test", type_name, REGIONS[0], 1_290_000))


def test_cluster_autoscaler_counts_a_node_unneeded_through_its_delay_after_a_scale_up() -> None:
    """Before the fix: the cluster-autoscaler peer stopped tracking unneeded nodes during
    `scale-down-delay-after-add`, so a node that fell idle just after another node was added
    was removed 10 min after the delay ended (20 min after the add) instead of once it had been
    unneeded for 10 min; the real autoscaler keeps updating its unneeded nodes in that delay
    and only holds back the deletion (static_autoscaler.go: UpdateClusterState, then
    isScaleDownInCooldown)."""
    fb = benchmark("fleet")
    cfg = fb.settings("cluster-autoscaler")
    world = World(billing_s=60.0, failures_per_gpu_hour=0.0)
    # One 1-GPU job for 10 min: the first node boots at 10 min and runs it until 20 min.
    sim = Sim(world, cfg, [JobSpec(0.0, 1, 600.0)])
    ca = ClusterAutoscaler(seed=1)
    _launch(sim, "gpu_1x_a100")
    gone_at = None
    for minute in range(1, 60):
        sim.step(minute * 60.0)
        if minute == 16:  # another node is added while the first is still busy
            _launch(sim, "gpu_1x_a100")
        now = BASE + timedelta(seconds=sim.now)
        acted = dict(sim.last_acted)
        for p in ca(sim.views(now), cfg, None, sim.signal(now, cfg)):
            sim.act(p, acted)
        if gone_at is None and sim.nodes["n1"].ended_at is not None:
            gone_at = minute
    # Idle from 20 min; the delay after the add ends at 26 min; unneeded for 10 min at 30.
    assert gone_at is not None and gone_at <= 31, gone_at


def _summary(scenario: str, policy: str, misses: int, deadlines: int) -> PlannerSummary:
    return PlannerSummary(
        scenario=scenario,
        policy=policy,
        jobs=100,
        completed=100,
        spent=500_000_000,
        charged=500_000_000.0,
        bound=495_000_000.0,
        deadline_jobs=deadlines,
        deadline_misses=misses,
        mean_finish_hours=5.0,
        failures=0,
        payments=100,
    )


def test_the_planner_report_counts_the_deadline_misses_of_the_market_that_has_deadlines() -> None:
    """Before the fix: `misses` and the goal "no deadline missed" were read on the failure-heavy
    market alone, which sets no deadline, so they said 0 and met whatever procure did on the
    deadline-tight market printed in the same table."""
    pb = benchmark("planner")
    rows = [
        _summary(scenario, policy, misses, deadlines)
        for scenario, deadlines in (("failure-heavy", 0), ("deadline-tight", 100))
        for policy, misses in (("oracle", 0), ("seeds", 60), ("procure", 7 if deadlines else 0))
    ]
    report = pb.report(rows, 100, 7, 1.0)
    assert report["misses"] == 7, report["misses"]
    goal = next(g for g in report["goals"] if "deadline" in str(g["goal"]))
    assert goal["met"] is False and goal["figure"] == "7", goal


def test_navarch_waits_its_cooldown_after_a_scale_down_before_it_scales_up() -> None:
    """Before the fix: the rails kept one cooldown per action type, so Navarch's queue-based
    autoscaler launched a node a minute after it had removed one; Navarch's pool keeps one
    `lastScale` for both directions (pkg/pool/pool.go: ScaleUp and ScaleDown refuse within
    `CooldownPeriod` of it; README: "All autoscalers respect the cooldown period")."""
    fb = benchmark("fleet")
    # A 10-min job: a node launched at the first scan, idle (and removed) at about 21 min; a
    # second job two minutes later must wait for the cooldown (5 min) after that removal.
    jobs = [JobSpec(0.0, 1, 600.0), JobSpec(23 * 60.0, 1, 600.0)]
    r = fb.one(("navarch-queue", "t", "minute", jobs, 1.0, 0))
    assert r.completed == 2 and r.terminations >= 1, r
    # The second job: queued at 23 min; a launch no earlier than 5 min after the removal, then
    # a 10-min boot. Without the shared cooldown it is launched at once and waits the boot.
    assert r.wait_p95_s >= (5 + 10 - 3) * 60.0, r
