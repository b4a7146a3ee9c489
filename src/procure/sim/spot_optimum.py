"""The hindsight optimum on a spot trace: the cheapest schedule that finishes by the deadline,
knowing every tick's availability (a lower bound on any policy's cost).

A dynamic programme over ticks. At a tick boundary a schedule is summed up by what it holds and
its deficit: the hours so far spent without progress (waiting and overheads), so progress is the
clock less the deficit and the job finishes at W + deficit. Per tick and holding, only the
(deficit, cost) pairs that no other pair beats on both are kept. A launch adds its overhead to
the deficit at once; that is exact when the overhead fits in a step, and pessimistic only for a
launch abandoned before its overhead is over (which never pays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from procure.sim.traces import EPS, Mode, Setting

UNITS_PER_HOUR = 36_000  # deficits are counted in tenths of a second, so that sums are exact

Frontier = dict[int, float]  # deficit (units) -> cheapest cost ($) reaching it


def _relax(frontier: Frontier, deficit: int, cost: float) -> None:
    if cost < frontier.get(deficit, math.inf):
        frontier[deficit] = cost


def _prune(frontier: Frontier, ceiling: float) -> Frontier:
    """Pairs that are cheaper than every pair with less deficit, and cheaper than `ceiling`."""
    kept: Frontier = {}
    best = ceiling
    for deficit in sorted(frontier):
        cost = frontier[deficit]
        if cost < best - EPS:
            kept[deficit] = cost
            best = cost
    return kept


def optimum(available: Sequence[bool], gap: float, setting: Setting) -> tuple[float, float]:
    """(cost, finish hour) of the cheapest on-time schedule for a job starting at tick 0."""
    unit = UNITS_PER_HOUR
    step = round(gap * unit)
    overhead = round(setting.overhead_hours * unit)
    task = round(setting.task_hours * unit)
    slack = round((setting.deadline_hours - setting.task_hours) * unit)
    price = {Mode.SPOT: setting.spot_price, Mode.ON_DEMAND: setting.on_demand_price}
    # The on-demand-only schedule bounds the search from the start.
    best = (setting.on_demand_price * (setting.task_hours + setting.overhead_hours), 0.0)
    best = (best[0], (task + overhead) / unit)
    states: dict[Mode, Frontier] = {Mode.NONE: {0: 0.0}, Mode.SPOT: {}, Mode.ON_DEMAND: {}}
    tick = 0
    while any(states.values()):
        here = tick < len(available) and available[tick]
        if not here:  # spot instances are taken away at this tick
            for deficit, cost in states[Mode.SPOT].items():
                _relax(states[Mode.NONE], deficit, cost)
            states[Mode.SPOT] = {}
        nxt: dict[Mode, Frontier] = {Mode.NONE: {}, Mode.SPOT: {}, Mode.ON_DEMAND: {}}
        clock = tick * step
        targets = (Mode.SPOT, Mode.ON_DEMAND) if here else (Mode.ON_DEMAND,)
        for held, frontier in states.items():
            for deficit, cost in frontier.items():
                if deficit + step <= slack:
                    _relax(nxt[Mode.NONE], deficit + step, cost)
                for mode in targets:
                    after = deficit if held == mode else deficit + overhead
                    if after > slack:
                        continue
                    end = task + after  # the finish time, if it falls in this step
                    if end <= clock + step:
                        total = cost + price[mode] * (end - clock) / unit
                        if total < best[0]:
                            best = (total, end / unit)
                    else:
                        _relax(nxt[mode], after, cost + price[mode] * step / unit)
        states = {mode: _prune(frontier, best[0]) for mode, frontier in nxt.items()}
        tick += 1
    return best
