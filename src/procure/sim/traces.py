"""Real spot-availability traces and the "Can't Be Late" setting: parsing, start ticks, the score,
and the one-step accounting (launch overhead, preemption, pro-rata cost) every policy shares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

EPS = 1e-9
SPOT_PRICE = 0.9701  # $/h
ON_DEMAND_PRICE = 3.06  # $/h
TASK_HOURS = 48.0
WINDOW_HOURS = 70.0  # the longest deadline: every start leaves room for it
STARTS = 30


class Mode(IntEnum):
    NONE = 0
    SPOT = 1
    ON_DEMAND = 2


@dataclass(frozen=True)
class Trace:
    name: str
    gap_seconds: int
    available: tuple[bool, ...]  # per tick: at least one spot instance

    @property
    def gap_hours(self) -> float:
        return self.gap_seconds / 3600


@dataclass(frozen=True)
class Setting:
    deadline_hours: float
    overhead_hours: float
    task_hours: float = TASK_HOURS
    spot_price: float = SPOT_PRICE
    on_demand_price: float = ON_DEMAND_PRICE

    def price(self, mode: Mode) -> float:
        return {Mode.NONE: 0.0, Mode.SPOT: self.spot_price, Mode.ON_DEMAND: self.on_demand_price}[
            mode
        ]


def parse_trace(text: str, name: str) -> Trace:
    """A trace file's JSON: any gap; a value of 1 or more means spot is available."""
    raw = json.loads(text)
    gap = int(raw["metadata"]["gap_seconds"])
    if gap <= 0:
        raise ValueError(f"{name}: gap_seconds must be positive, got {gap}")
    return Trace(name, gap, tuple(float(v) >= 1 for v in raw["data"]))


def load_trace(path: Path, root: Path | None = None) -> Trace:
    """Named by its path from `root` (the folder given on the command line) when there is one,
    with the folder's own name in front, as the README's output format writes it."""
    name = path.name if root is None else f"{root.name}/{path.relative_to(root)}"
    return parse_trace(path.read_text(), name)


def trace_paths(paths: Iterable[Path]) -> list[tuple[Path, Path | None]]:
    """(file, folder it was found in or None) for each file given and each .json under a folder."""
    found: list[tuple[Path, Path | None]] = []
    for path in paths:
        if path.is_dir():
            found += [(p, path) for p in sorted(path.rglob("*.json"))]
        else:
            found.append((path, None))
    return found


def start_ticks(trace: Trace, count: int = STARTS, window_hours: float = WINDOW_HOURS) -> list[int]:
    """Up to `count` start ticks evenly spaced over those where a `window_hours` window fits."""
    window = math.ceil(window_hours / trace.gap_hours - EPS)
    last = len(trace.available) - window
    if last < 0 or count <= 0:
        return []
    if count == 1 or last == 0:
        return [0]
    n = min(count, last + 1)
    return sorted({round(k * last / (n - 1)) for k in range(n)})


def score(mean_cost: float, on_demand_cost: float, setting: Setting, missed: int) -> float:
    """The README's score: the share of on-demand's cost saved, against all-spot's saving."""
    if missed:
        return -100_000.0
    floor = setting.task_hours * setting.spot_price
    return min(max((on_demand_cost - mean_cost) / (on_demand_cost - floor), 0.0), 1.0) * 100


@dataclass
class Job:
    """One job's state on its own clock (hours since its start tick)."""

    mode: Mode = Mode.NONE
    overhead_left: float = 0.0  # paid hours still to go before the instance makes progress
    done: float = 0.0  # hours of work done (kept through preemptions)
    cost: float = 0.0  # dollars
    hours: float = 0.0  # the clock
    finished: float | None = None
    launches: int = 0

    def work_left(self, setting: Setting) -> float:
        return max(setting.task_hours - self.done, 0.0)

    def slack(self, setting: Setting) -> float:
        """Hours beyond the work left before the deadline (overheads still to pay included)."""
        return setting.deadline_hours - self.hours - self.work_left(setting) - self.overhead_left


def preempt_if_gone(job: Job, available: bool) -> bool:
    """At a tick: a spot instance whose capacity is gone is taken away; progress stays."""
    if job.mode == Mode.SPOT and not available:
        job.mode, job.overhead_left = Mode.NONE, 0.0
        return True
    return False


def hold(job: Job, mode: Mode, setting: Setting, hours: float) -> None:
    """Hold `mode` for `hours` (one step, or less): a launch (a change to SPOT or ON_DEMAND from
    anything else) starts a new overhead in place of what was left of the last one; cost is
    price times time held, and the job stops (pro rata) the moment its work is done."""
    if mode != job.mode:
        job.overhead_left = setting.overhead_hours if mode != Mode.NONE else 0.0
        job.launches += mode != Mode.NONE
        job.mode = mode
    if mode == Mode.NONE:
        job.hours += hours
        return
    need = job.overhead_left + job.work_left(setting)
    used = min(hours, need)
    productive = max(used - job.overhead_left, 0.0)
    job.overhead_left = max(job.overhead_left - used, 0.0)
    job.done += productive
    job.cost += setting.price(mode) * used
    job.hours += used
    if used >= need - EPS:
        job.done = setting.task_hours
        job.finished = job.hours
        job.mode = Mode.NONE


def on_demand_cost(setting: Setting) -> float:
    """On-demand only from the start: one launch, then the work."""
    return setting.on_demand_price * (setting.overhead_hours + setting.task_hours)


def window(trace: Trace, start: int, setting: Setting) -> Sequence[bool]:
    """The ticks a job started at `start` can use (the trace past its deadline is irrelevant)."""
    ticks = math.ceil(setting.deadline_hours / trace.gap_hours - EPS) + 1
    return trace.available[start : start + ticks]
