"""The best policy that knows a spot trace's statistics but not its future: availability as a
semi-Markov chain fitted to the trace, and the exact optimal policy for it by dynamic programming.

The chain: spot is up or down, and the chance that a run of either ends at the next tick depends
on how long it has lasted (its age, in ticks; ages past `AGE_CAP` share one rate), as the trace's
run lengths say (Kaplan-Meier: ends at each age over runs at risk there, the trace's first and
last runs censored). The job starts at a tick drawn from the chain's stationary distribution: it
sees whether spot is up, not how long it has been, so the first run's age is a belief (the
stationary ages, conditioned on the ticks it has lasted since the start); once a run is seen to
begin its age is known. That belief is a function of the ticks seen, so the policy's state is
(tick, deficit, what it holds, spot up, age or ticks seen in a censored run) and the programme
over it is exact: its value is the least expected cost of any policy that knows the chain, and
its argmin is that policy.

The deficit is the setting's own: hours spent without progress (waits and launch overheads), in
units of the greatest common divisor of the step and the overhead, so sums are exact. A launch's
overhead fits in its step when the overhead is at most a step, which the programme requires; it
is not solved either where its table would pass `MAX_TABLE_BYTES` (steps much finer than the
traces' 10 minutes, or a step and overhead with a tiny common divisor, such as 599 s and 72 s).

The model is a choice: it keeps no memory beyond a run's age (capped at two hours) and no time
of day, and what it says a policy can close depends on it (on us-west-2a_v100_8 at D = 52 h,
R = 0.1 h: 82 % of Uniform Progress's gap with the age capped at 20 minutes, 70 % at two hours,
68 % at eight). Its optimum is exact for the model, not for the trace.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from procure.sim.spot_policies import StepPolicy
from procure.sim.traces import EPS, Job, Mode, Setting

AGE_CAP = 12  # ticks (two hours at the traces' 10-minute step): older runs share one rate
MAX_TABLE_BYTES = 600 * 2**20  # the policy's table; finer traces are not solved
INF = math.inf


@dataclass(frozen=True)
class Chain:
    """Per state (0 down, 1 up), the chance a run of age k ends at the next tick, k = 0..AGE_CAP
    (the last for every age from AGE_CAP on)."""

    hazard: tuple[tuple[float, ...], tuple[float, ...]]

    @property
    def cap(self) -> int:
        return len(self.hazard[0]) - 1


def runs(available: Sequence[bool]) -> list[tuple[bool, int, bool]]:
    """(state, length in ticks, censored) for each run of the trace; the first and last runs are
    censored (they began before, or end after, what the trace shows)."""
    out: list[tuple[bool, int, bool]] = []
    start = 0
    for i in range(1, len(available) + 1):
        if i == len(available) or available[i] != available[start]:
            out.append((available[start], i - start, start == 0 or i == len(available)))
            start = i
    return out


def fit(available: Sequence[bool], cap: int = AGE_CAP) -> Chain:
    """The chain whose run-length hazards are the trace's (Kaplan-Meier per age up to `cap`,
    pooled beyond); a state never seen to end gets the least rate the trace could show."""
    hazards = []
    for state in (False, True):
        ends = [0] * (cap + 1)
        risk = [0] * (cap + 1)
        for s, length, censored in runs(available):
            if s != state:
                continue
            for age in range(length):
                risk[min(age, cap)] += 1
            if not censored:
                ends[min(length - 1, cap)] += 1
        floor = 1 / (2 * max(len(available), 1))
        pooled = (sum(ends) / sum(risk)) if sum(risk) else 0.5
        rate = [
            min(max(ends[k] / risk[k] if risk[k] else max(pooled, floor), floor), 1.0)
            for k in range(cap + 1)
        ]
        hazards.append(tuple(rate))
    return Chain((hazards[0], hazards[1]))


@dataclass(frozen=True)
class Beliefs:
    """The chain's states as the job sees them. Index i < n_known: (state, known age); then the
    censored first run: (state, ticks seen since the start) for 0..cap-1 (from cap on its age is
    known to be past the cap, the same as known age cap)."""

    state: np.ndarray  # bool per index
    end: np.ndarray  # chance the run ends at the next tick
    stay: np.ndarray  # index if it goes on
    flip: np.ndarray  # index if it ends (the other state, age 0)
    start: dict[bool, int]  # index at the job's start, by whether spot is up
    up_share: float  # stationary share of ticks with spot up


def _known(state: bool, age: int, cap: int) -> int:
    return int(state) * (cap + 1) + min(age, cap)


def _stationary(chain: Chain) -> np.ndarray:
    """Stationary probabilities of (state, age) over the known-age indices."""
    cap = chain.cap
    n = 2 * (cap + 1)
    p = np.zeros((n, n))
    for state in (False, True):
        for age in range(cap + 1):
            i, h = _known(state, age, cap), chain.hazard[int(state)][age]
            p[i, _known(state, age + 1, cap)] += 1 - h
            p[i, _known(not state, 0, cap)] += h
    p = (p + np.eye(n)) / 2  # lazy: the same stationary law, and no periodic chain stalls
    pi = np.full(n, 1 / n)
    for _ in range(50_000):  # power iteration; the chain is small
        nxt = pi @ p
        if np.abs(nxt - pi).sum() < 1e-13:
            break
        pi = nxt
    return pi / pi.sum()


def beliefs(chain: Chain) -> Beliefs:
    cap = chain.cap
    n_known = 2 * (cap + 1)
    n = n_known + 2 * cap
    state = np.zeros(n, dtype=bool)
    end = np.zeros(n)
    stay = np.zeros(n, dtype=np.int64)
    flip = np.zeros(n, dtype=np.int64)
    for s in (False, True):
        for age in range(cap + 1):
            i = _known(s, age, cap)
            state[i], end[i] = s, chain.hazard[int(s)][age]
            stay[i], flip[i] = _known(s, age + 1, cap), _known(not s, 0, cap)
    pi = _stationary(chain)
    start: dict[bool, int] = {}
    for s in (False, True):
        hz = np.array(chain.hazard[int(s)])
        belief = np.array([pi[_known(s, a, cap)] for a in range(cap + 1)])
        belief = belief / belief.sum()
        for seen in range(cap):
            i = n_known + int(s) * cap + seen
            state[i], end[i] = s, float(belief @ hz)
            stay[i] = n_known + int(s) * cap + seen + 1 if seen + 1 < cap else _known(s, cap, cap)
            flip[i] = _known(not s, 0, cap)
            # The run went on: every age moved up one (capped), weighted by not ending.
            moved = np.zeros(cap + 1)
            for a in range(cap + 1):
                moved[min(a + 1, cap)] += belief[a] * (1 - hz[a])
            belief = moved / moved.sum() if moved.sum() > 0 else moved
        start[s] = n_known + int(s) * cap
    up = sum(pi[_known(True, a, cap)] for a in range(cap + 1))
    return Beliefs(state, end, stay, flip, start, float(up))


@dataclass(frozen=True)
class Programme:
    """The optimal policy's table and its value."""

    unit_s: int  # seconds per deficit unit
    step_units: int
    overhead_units: int
    slack_units: int
    beliefs: Beliefs
    choice: np.ndarray  # int8 [tick, held mode, belief index, deficit] -> Mode
    value: np.ndarray  # float [held mode, belief index, deficit] at tick 0

    def expected_cost(self) -> float:
        """The least expected cost of a job started at a stationary tick."""
        b = self.beliefs
        return b.up_share * float(self.value[Mode.NONE, b.start[True], 0]) + (
            1 - b.up_share
        ) * float(self.value[Mode.NONE, b.start[False], 0])


def _grid(setting: Setting, gap_hours: float) -> tuple[int, int, int, int, int]:
    """(seconds per deficit unit, step units, overhead units, slack units, ticks)."""
    step_s, over_s = round(gap_hours * 3600), round(setting.overhead_hours * 3600)
    unit = math.gcd(step_s, over_s) if over_s else step_s
    slack = math.floor((setting.deadline_hours - setting.task_hours) * 3600 / unit + EPS)
    ticks = math.ceil(setting.deadline_hours / gap_hours - EPS) + 1
    return unit, step_s // unit, over_s // unit, slack, ticks


def solvable(setting: Setting, gap_hours: float, cap: int = AGE_CAP) -> bool:
    """The programme is exact when a launch's overhead fits in one step, and solved only where
    its table fits in memory (traces of steps much finer than the overhead are not)."""
    if setting.overhead_hours > gap_hours + EPS or setting.deadline_hours < setting.task_hours:
        return False
    _, _, _, slack, ticks = _grid(setting, gap_hours)
    return ticks * 3 * 2 * (2 * cap + 1) * (slack + 1) <= MAX_TABLE_BYTES


def solve(chain: Chain, gap_hours: float, setting: Setting) -> Programme:
    """Backwards over ticks: the value and best choice of every state."""
    if not solvable(setting, gap_hours, chain.cap):
        raise ValueError(
            "not solved: the launch overhead must fit in one step, and the policy's table in "
            f"{MAX_TABLE_BYTES >> 20} MB"
        )
    unit, g, r, slack, ticks = _grid(setting, gap_hours)
    step_s = unit * g
    work_s = setting.task_hours * 3600
    b = beliefs(chain)
    n = len(b.state)
    d = np.arange(slack + 1)
    price = {Mode.SPOT: setting.spot_price / 3600, Mode.ON_DEMAND: setting.on_demand_price / 3600}
    choice = np.zeros((ticks, 3, n, slack + 1), dtype=np.int8)
    nxt = np.full((3, n, slack + 1), INF)  # past the last tick nothing unfinished is on time
    up = b.state
    for t in range(ticks - 1, -1, -1):
        # Expected value at the next tick, per mode held now: spot held through a tick where
        # it is gone is released (progress kept).
        cont = {}
        for mode in (Mode.NONE, Mode.SPOT, Mode.ON_DEMAND):

            def held_next(idx: np.ndarray, mode: Mode = mode) -> np.ndarray:
                if mode != Mode.SPOT:
                    return np.full(idx.shape, int(mode))
                return np.where(up[idx], int(Mode.SPOT), int(Mode.NONE))

            same = nxt[held_next(b.stay), b.stay]
            other = nxt[held_next(b.flip), b.flip]
            # A branch of chance 0 adds nothing, even where its value is infinite.
            goes_on, ends = (1 - b.end)[:, None], b.end[:, None]
            with np.errstate(invalid="ignore"):
                cont[mode] = np.where(goes_on > 0, goes_on * same, 0.0) + np.where(
                    ends > 0, ends * other, 0.0
                )
        left_s = work_s - t * step_s + d * unit  # work left at each deficit
        cur = np.full((3, n, slack + 1), INF)
        for held in (Mode.NONE, Mode.SPOT, Mode.ON_DEMAND):
            options = []
            wait = np.full((n, slack + 1), INF)
            wait[:, : max(slack + 1 - g, 0)] = cont[Mode.NONE][:, g:]
            options.append(wait)
            for mode in (Mode.SPOT, Mode.ON_DEMAND):
                launch = 0 if held == mode else r
                need = np.maximum(left_s + launch * unit, 0)
                done_now = need <= step_s + 1e-6
                fits = slice(0, max(slack + 1 - launch, 0))
                shifted = np.full((n, slack + 1), INF)
                shifted[:, fits] = cont[mode][:, launch:]
                val = np.where(done_now[None, :], price[mode] * need[None, :], 0.0)
                val = np.where(done_now[None, :], val, price[mode] * step_s + shifted)
                val[:, slack + 1 - launch :] = INF
                if mode == Mode.SPOT:
                    val[~up, :] = INF
                options.append(val)
            stacked = np.stack(options)  # [NONE, SPOT, ON_DEMAND]
            best = stacked.argmin(axis=0)
            cur[held] = np.take_along_axis(stacked, best[None], axis=0)[0]
            # Where nothing is on time any more, on-demand at once misses by the least.
            best = np.where(np.isinf(cur[held]), int(Mode.ON_DEMAND), best)
            choice[t, held] = best.astype(np.int8)
        if t > 0:
            # Spot cannot be held at a tick where it is down.
            cur[Mode.SPOT, ~up, :] = INF
        nxt = cur
    return Programme(unit, g, r, slack, b, choice, nxt)


def mdp_policy(programme: Programme, setting: Setting) -> StepPolicy:
    """The programme's choices, played: its state followed from what the job has seen."""
    b = programme.beliefs
    index = -1
    tick = 0

    def step(job: Job, here: bool, setting: Setting, gap: float) -> Mode:
        nonlocal index, tick
        if index < 0:
            index = b.start[here]
        elif bool(b.state[b.stay[index]]) == here:
            index = int(b.stay[index])
        else:
            index = int(b.flip[index])
        deficit = max(round((job.hours - job.done) * 3600 / programme.unit_s), 0)
        t = min(tick, programme.choice.shape[0] - 1)
        tick += 1
        if deficit > programme.slack_units:  # late whatever it does: finish as soon as it can
            return Mode.ON_DEMAND
        mode = Mode(int(programme.choice[t, job.mode, index, deficit]))
        if mode == Mode.SPOT and not here:  # only off the programme's states: never expected
            return Mode.ON_DEMAND
        return mode

    return step


def sampler(chain: Chain) -> Callable[[int, random.Random], list[bool]]:
    """Draws windows of the chain from a stationary start: the law the programme assumes."""
    b = beliefs(chain)
    cap = chain.cap
    weights = _stationary(chain).tolist()
    indices = range(len(weights))

    def draw(ticks: int, rng: random.Random) -> list[bool]:
        i = rng.choices(indices, weights=weights)[0]
        out = []
        for _ in range(ticks):
            out.append(i >= cap + 1)  # known-age indices: down ages 0..cap, then up
            i = int(b.flip[i]) if rng.random() < b.end[i] else int(b.stay[i])
        return out

    return draw
