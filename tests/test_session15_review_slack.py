"""The slack rule at its edges: a run with no start-up time (the spot benchmark's
`--overheads 0`) and no slack left, while the cheap vendor has no capacity, is decided, not
crashed."""

from __future__ import annotations

from procure.agent import deadline
from procure.models import Action
from procure.sim.spot_engine import ON_DEMAND, _Agent, _new_run, registry
from procure.sim.traces import Setting

TEN_MINUTES = 1 / 6


def decide_in_outage(work: float, slack: float, overhead: float, outage_hours: float) -> Action:
    """The slack rule's decision for a run with `work` hours to do and `slack` hours to spare,
    whose spot vendor has had no capacity since the run began `outage_hours` ago (checked
    again in ten minutes); nothing has run yet."""
    setting = Setting(
        deadline_hours=outage_hours + work + slack, overhead_hours=overhead, task_hours=work
    )
    agent = _Agent(setting, _new_run(setting), registry(setting))
    agent.set_capacity(False, outage_hours, TEN_MINUTES)
    ctx = agent.context(outage_hours)
    assert deadline.applies(ctx)
    return deadline.plan(ctx, list(agent.vendors.values()))


def test_no_slack_and_no_start_up_goes_on_demand() -> None:
    """Before the fix: with no start-up time and no slack left, the waiting weight divided the
    work left by max(slack, start-up) = 0 (ZeroDivisionError): the planner crashed instead of
    going on-demand, the only way left to meet the deadline."""
    action = decide_in_outage(work=1.0, slack=0.0, overhead=0.0, outage_hours=0.5)
    assert action.action == "start_job" and action.vendor_id == ON_DEMAND


def test_past_the_slack_with_no_start_up_goes_on_demand() -> None:
    """Before the fix: the same division by zero once the run is already late (negative
    slack): it crashed rather than run on-demand to finish as soon as it can."""
    action = decide_in_outage(work=1.0, slack=-0.1, overhead=0.0, outage_hours=0.5)
    assert action.action == "start_job" and action.vendor_id == ON_DEMAND


def test_slack_with_no_start_up_still_waits_for_spot() -> None:
    """A run with slack and free restarts still waits out a short outage (the guard changes
    nothing away from zero)."""
    action = decide_in_outage(work=1.0, slack=0.5, overhead=0.0, outage_hours=0.5)
    assert action.action == "wait"
