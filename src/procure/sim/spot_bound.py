"""The spot benchmark's true limit: what a policy that knows a trace's availability statistics,
but not its future, can close of Uniform Progress's gap to the hindsight optimum.

Per trace, availability is fitted as a semi-Markov chain (`spot_mdp.fit`) and its exact optimal
policy solved. Two figures follow:

- on the real windows, that policy's cost (the "stats-optimal" row): it knows each trace's own
  statistics, the windows' futures included (in sample), so it is no bound there, only a sign
  of what a policy that learns them well might reach;
- in the chain's own world (windows drawn from it), the optimum's exact expected cost, a lower
  bound on every non-clairvoyant policy's there, beside Uniform Progress, the hindsight optimum
  and procure's planner on the same drawn windows: how much of the gap is closable at all in
  that model (the others' expected costs are estimates: a standard error is printed).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from procure.sim.spot_engine import play_planner
from procure.sim.spot_mdp import Chain, Programme, fit, mdp_policy, sampler, solvable, solve
from procure.sim.spot_optimum import optimum
from procure.sim.spot_policies import play, uniform_progress
from procure.sim.traces import EPS, Setting, Trace

STATS_OPTIMAL = "stats-optimal"
LEARNED = "learned"
# Hours of an offer's recorded availability before a job's start after which the learned policy
# trusts a chain fitted on them (before that it is procure's planner).
LEARN_AFTER_HOURS = 48.0


def programmes(trace: Trace, settings: Sequence[Setting]) -> tuple[Chain, dict[Setting, Programme]]:
    """The trace's chain, and its optimal policy per setting (where the programme is exact)."""
    chain = fit(trace.available)
    return chain, {
        s: solve(chain, trace.gap_hours, s) for s in settings if solvable(s, trace.gap_hours)
    }


def stats_optimal(
    available: Sequence[bool], gap: float, setting: Setting, programme: Programme
) -> tuple[float, float | None]:
    """(cost, finish hour) of the optimal policy of the trace's chain on a real window."""
    job = play(available, gap, setting, mdp_policy(programme, setting))
    return job.cost, job.finished


def learned(
    trace: Trace, start: int, ticks: Sequence[bool], setting: Setting
) -> tuple[float, float | None] | None:
    """(cost, finish hour) on the window `ticks` starting at `start` of the optimal policy of
    the chain fitted on the trace before `start` alone (out of sample: nothing of the window's
    future); None where that past is under `LEARN_AFTER_HOURS` or the programme cannot be
    solved, where the learned policy is procure's planner."""
    gap = trace.gap_hours
    past = trace.available[:start]
    if len(past) * gap < LEARN_AFTER_HOURS or not solvable(setting, gap):
        return None
    return stats_optimal(ticks, gap, setting, solve(fit(past), gap, setting))


@dataclass(frozen=True)
class ModelRow:
    """One trace and setting in its chain's world: the exact optimum's expected cost, and per
    drawn window each policy's cost less the optimal policy's on that window. The optimal
    policy's mean over the windows is known exactly (the bound), so each policy's expected cost
    is estimated as bound + mean difference: a control variate, far tighter than raw means."""

    trace: str
    deadline_hours: float
    overhead_hours: float
    bound: float  # exact least expected cost of a non-clairvoyant policy
    up: tuple[float, ...]  # Uniform Progress less the optimal policy, per window
    hindsight: tuple[float, ...]
    procure: tuple[float, ...]
    procure_misses: int


def model_rows(
    trace: Trace,
    chain: Chain,
    progs: dict[Setting, Programme],
    windows: int,
    seed: int = 0,
    skip: int = 0,
) -> list[ModelRow]:
    """The chain's world for every setting, on `windows` windows drawn from it (the same
    windows for every policy; seeded by trace name, so runs repeat), after the first `skip`
    of that sequence: windows can be played in parts, in parallel, and stay the same."""
    out = []
    draw = sampler(chain)
    for setting, prog in progs.items():
        rng = random.Random(f"{seed}:{trace.name}:{setting.deadline_hours}")
        ticks = math.ceil(setting.deadline_hours / trace.gap_hours - EPS) + 1
        for _ in range(skip):
            draw(ticks, rng)
        up, hind, ours = [], [], []
        misses = 0
        for _ in range(windows):
            w = draw(ticks, rng)
            best = stats_optimal(w, trace.gap_hours, setting, prog)[0]
            up.append(play(w, trace.gap_hours, setting, uniform_progress()).cost - best)
            hind.append(optimum(w, trace.gap_hours, setting)[0] - best)
            played = play_planner(w, trace.gap_hours, setting)
            ours.append(played.cost - best)
            done = played.account.finished
            misses += done is None or done > setting.deadline_hours + EPS
        out.append(
            ModelRow(
                trace.name,
                setting.deadline_hours,
                setting.overhead_hours,
                prog.expected_cost(),
                tuple(up),
                tuple(hind),
                tuple(ours),
                misses,
            )
        )
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


@dataclass(frozen=True)
class ModelSummary:
    """Per setting over every trace's world (traces weighted alike: the same windows each)."""

    deadline_hours: float
    overhead_hours: float
    windows: int
    bound: float  # mean over traces of the exact optimum's expected cost
    uniform_progress: float  # estimated expected costs (bound + mean difference)
    hindsight: float
    procure: float
    procure_misses: int
    closable: float  # the exact optimum's share of Uniform Progress's gap to hindsight
    closable_se: float  # its standard error over the windows
    procure_closed: float


def _ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """mean(num) / mean(den) and its standard error (linearised over the windows)."""
    a, b = _mean(num), _mean(den)
    if not num or abs(b) < EPS:
        return 1.0, 0.0
    r = a / b
    resid = [(x - r * y) / b for x, y in zip(num, den, strict=True)]
    m = _mean(resid)
    var = sum((e - m) ** 2 for e in resid) / max(len(resid) - 1, 1)
    return r, math.sqrt(var / len(resid))


def summarize_model(rows: Sequence[ModelRow]) -> list[ModelSummary]:
    keys = sorted({(r.deadline_hours, r.overhead_hours) for r in rows})
    out = []
    for d, o in keys:
        g = [r for r in rows if (r.deadline_hours, r.overhead_hours) == (d, o)]
        # One row per trace, or several where its windows were played in parts.
        bound = _mean(list({r.trace: r.bound for r in g}.values()))
        up = [x for r in g for x in r.up]
        hind = [x for r in g for x in r.hindsight]
        ours = [x for r in g for x in r.procure]
        gap = [u - h for u, h in zip(up, hind, strict=True)]
        closable, se = _ratio(up, gap)
        closed, _ = _ratio([u - p for u, p in zip(up, ours, strict=True)], gap)
        out.append(
            ModelSummary(
                d,
                o,
                len(up),
                bound,
                bound + _mean(up),
                bound + _mean(hind),
                bound + _mean(ours),
                sum(r.procure_misses for r in g),
                closable,
                se,
                closed,
            )
        )
    return out
