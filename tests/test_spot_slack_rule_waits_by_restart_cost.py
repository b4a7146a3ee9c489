"""The slack rule's waits while the cheap vendor has no capacity: how long an outage a tight run
waits out depends on what a restart costs, a wait never leaves too little slack to go back to
the cheap vendor, and a run with no start-up time (`--overheads 0`) and no slack is decided, not
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


def test_a_tight_run_leaves_a_long_outage_sooner_the_dearer_a_restart() -> None:
    """Before the fix: the waiting tally did not depend on the restart overhead, so a 48 h job
    with 4 h of slack, two hours into an outage, waited on with 3-minute restarts as with
    1.2-minute ones, spending slack that its many later restarts needed (on the real traces the
    exact optimum of their fitted chains goes on-demand there)."""
    cheap = decide_in_outage(work=48.0, slack=4.0, overhead=0.02, outage_hours=2.0)
    dear = decide_in_outage(work=48.0, slack=4.0, overhead=0.05, outage_hours=2.0)
    assert cheap.action == "wait"
    assert dear.action == "start_job" and dear.vendor_id == ON_DEMAND


def test_a_wait_never_leaves_too_little_slack_to_go_back_to_spot() -> None:
    """Before the fix: a 1 h job due in 1.3 h (restarts 0.05 h) waited ten minutes for spot,
    leaving 0.13 h of slack: enough to start on-demand, but under the two start-ups a return
    to spot needs once it has started there, so a later blip would pin it to on-demand."""
    action = decide_in_outage(work=1.0, slack=0.3, overhead=0.05, outage_hours=0.0)
    assert action.action == "start_job" and action.vendor_id == ON_DEMAND
    roomy = decide_in_outage(work=1.0, slack=0.5, overhead=0.05, outage_hours=0.0)
    assert roomy.action == "wait"


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
