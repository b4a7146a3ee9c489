"""The reference policies on a spot trace (on-demand only, greedy, Uniform Progress) and the loop
that plays any per-step policy over a trace window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from procure.sim.traces import EPS, Job, Mode, Setting, hold, preempt_if_gone

# (job, spot available at this tick, setting, step hours) -> what to hold for the next step
StepPolicy = Callable[[Job, bool, Setting, float], Mode]


def safe(job: Job, mode: Mode, setting: Setting, gap: float) -> bool:
    """Whether holding `mode` for one step still leaves time, in the worst case (spot gone at the
    next tick), to launch on-demand then and finish by the deadline."""
    if mode == Mode.ON_DEMAND:
        return True
    after = replace(job)
    hold(after, mode, setting, gap)
    if after.finished is not None:
        return after.finished <= setting.deadline_hours + EPS
    need = setting.overhead_hours + after.work_left(setting)
    return after.hours + need <= setting.deadline_hours + EPS


def play(available: Sequence[bool], gap: float, setting: Setting, policy: StepPolicy) -> Job:
    """Run one job from tick 0 of `available` until it finishes (past the window: no spot)."""
    job = Job()
    tick = 0
    while job.finished is None:
        here = tick < len(available) and available[tick]
        preempt_if_gone(job, here)
        mode = policy(job, here, setting, gap)
        if mode == Mode.SPOT and not here:
            raise ValueError("a policy chose spot in a step where spot is unavailable")
        hold(job, mode, setting, gap)
        tick += 1
    return job


def on_demand_only() -> StepPolicy:
    return lambda job, here, setting, gap: Mode.ON_DEMAND


def greedy() -> StepPolicy:
    """Spot whenever available, otherwise wait; on-demand for good once waiting (or one more spot
    step) could miss the deadline."""
    committed = False

    def step(job: Job, here: bool, setting: Setting, gap: float) -> Mode:
        nonlocal committed
        want = Mode.SPOT if here else Mode.NONE
        if committed or not safe(job, want, setting, gap):
            committed = True
            return Mode.ON_DEMAND
        return want

    return step


def uniform_progress(hysteresis_overheads: float = 2.0) -> StepPolicy:
    """The paper's Uniform Progress: keep progress at or above the line W·t/D. Spot when
    available; on-demand when behind the line and spot is unavailable; off on-demand once ahead
    of the line by `hysteresis_overheads` restart overheads; plus greedy's deadline safety net."""
    committed = False

    def step(job: Job, here: bool, setting: Setting, gap: float) -> Mode:
        nonlocal committed
        line = setting.task_hours * job.hours / setting.deadline_hours
        ahead = job.done - line
        if job.mode == Mode.ON_DEMAND and ahead < hysteresis_overheads * setting.overhead_hours:
            want = Mode.ON_DEMAND
        elif here:
            want = Mode.SPOT
        else:
            want = Mode.ON_DEMAND if ahead < 0 else Mode.NONE
        if committed or not safe(job, want, setting, gap):
            committed = True
            return Mode.ON_DEMAND
        return want

    return step
