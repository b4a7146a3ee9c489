"""Expected cost to completion of renting one vendor, under a constant failure hazard.

The planner's arithmetic, kept apart so that it can be read and tested on its own. The model:
a vendor fails after an exponentially distributed time (its hazard, failures per hour, counted
from the moment it is paid: start-up included); the job saves a checkpoint every
`checkpoint_every` of its progress; money is paid in slices, the next one when `renew_fraction`
of the current one is left; a failure loses the work since the last checkpoint and whatever
paid time was not used, and the rest of the job is then bought at the best long-run rate on
offer. Money is micro-USD, as floats here because these are
expectations, not amounts to pay.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

MIN_HAZARD = 1e-9  # keeps the geometric sums finite for a vendor that never fails
MAX_EXPONENT = 700.0  # math.exp overflows a float a little above 709
EPS = 1e-9


@dataclass(frozen=True)
class Terms:
    """What renting one vendor costs and risks."""

    price_per_hour: float  # micro-USD
    hazard: float  # failures per hour
    payment_overhead: float  # micro-USD per payment
    startup_hours: float


@dataclass(frozen=True)
class Estimate:
    slice_hours: float  # bought per payment
    payments: int  # how many payments if nothing fails
    nominal: float  # list price of the work if nothing fails (what the budget must cover)
    money_here: float  # expected payments to this vendor
    redo_hours: float  # expected hours of work left to buy elsewhere after a failure
    expected: float  # expected total cost to completion
    p_complete: float  # chance this vendor finishes without failing


def intervals(total_hours: float, checkpoint_every: float, start_progress: float) -> list[float]:
    """Hours of work between consecutive checkpoints, from `start_progress` to the end.

    Checkpoints fall at whole multiples of `checkpoint_every` of the run's progress, so a job
    resumed from one is aligned with them; the last interval may be shorter.
    """
    step = min(max(checkpoint_every, 1e-4), 1.0)
    first = math.floor(start_progress / step + EPS) + 1
    bounds = [start_progress]
    n = first
    while n * step < 1 - EPS:
        bounds.append(n * step)
        n += 1
    bounds.append(1.0)
    return [(b - a) * total_hours for a, b in itertools.pairwise(bounds) if b > a]


def slice_options(work: list[float]) -> list[float]:
    """Candidate slice lengths in hours: a quarter and a half of a checkpoint interval (finer
    than the checkpoints, when payments are cheap and failures frequent), whole intervals
    roughly doubling, and everything at once."""
    if not work:
        return []
    k, total = max(work), sum(work)
    multiples = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
    hours = {k / 4, k / 2} | {n * k for n in multiples}
    return [*sorted(h for h in hours if h < total - EPS), total]


def _survival(terms: Terms, work_hours: float) -> float:
    return math.exp(-max(terms.hazard, 0.0) * (terms.startup_hours + work_hours))


def estimate(
    terms: Terms,
    work: list[float],
    slice_hours: float,
    *,
    renew_fraction: float,
    redo_rate: float,
) -> Estimate:
    """Expected cost of running `work` (hours per checkpoint interval) on one vendor, paying
    for `slice_hours` at a time, and buying whatever a failure leaves at `redo_rate`
    (micro-USD per useful hour).
    """
    total = sum(work)
    size = min(max(slice_hours, EPS), total)
    count = max(1, math.ceil(total / size - 1e-6))
    chunks = [size] * (count - 1) + [total - size * (count - 1)]
    money = 0.0
    done = 0.0
    for i, hours in enumerate(chunks):
        # Slice i+1 is paid when `renew_fraction` of slice i is left: only if still alive then.
        paid_at = 0.0 if i == 0 else max(done - renew_fraction * chunks[i - 1], 0.0)
        alive = 1.0 if i == 0 else _survival(terms, paid_at)
        money += alive * (terms.price_per_hour * hours + terms.payment_overhead)
        done += hours
    saved_if_failed = 0.0  # E[work kept by checkpoints ; the vendor fails]
    cumulative = 0.0
    survive = _survival(terms, 0.0)
    for hours in work:
        nxt = _survival(terms, cumulative + hours)
        saved_if_failed += cumulative * (survive - nxt)
        cumulative += hours
        survive = nxt
    p_complete = _survival(terms, total)
    redo = (1 - p_complete) * total - saved_if_failed
    nominal = terms.price_per_hour * total
    return Estimate(
        slice_hours=chunks[0],
        payments=len(chunks),
        nominal=nominal,
        money_here=money,
        redo_hours=redo,
        expected=money + redo * redo_rate,
        p_complete=p_complete,
    )


def long_run_rate(
    terms: Terms, interval_hours: float, slice_hours: float, *, renew_fraction: float
) -> float:
    """Micro-USD per useful hour of an endless job on this vendor (renewal-reward): money paid
    per attempt over work kept per attempt, an attempt lasting until the vendor fails.
    """
    lam = max(terms.hazard, MIN_HAZARD)
    k = max(interval_hours, EPS)
    s = max(slice_hours, EPS)
    start = math.exp(-lam * terms.startup_hours)
    # Checkpoints reached: sum over j >= 1 of P(alive at j*k) = start * q / (1 - q).
    q = math.exp(-lam * k)
    kept = k * start * q / -math.expm1(-lam * k)
    if kept <= 0:  # a vendor that dies before its first checkpoint keeps nothing: never worth it
        return math.inf
    # Slices paid: the first always, slice i >= 2 if alive when it is renewed (the exponent is
    # capped: a learned hazard of thousands an hour must not overflow a plan for every run).
    grow = math.exp(min(lam * renew_fraction * s - lam * s, MAX_EXPONENT))
    later = start * grow / -math.expm1(-lam * s)
    paid = (terms.price_per_hour * s + terms.payment_overhead) * (1 + later)
    return paid / kept


def best_long_run_rate(terms: Terms, work: list[float], *, renew_fraction: float) -> float:
    return min(
        long_run_rate(terms, max(work), s, renew_fraction=renew_fraction)
        for s in slice_options(work)
    )


def miss_probability(
    hazard: float,
    work_hours: float,
    startup_hours: float,
    hours_left: float | None,
    *,
    interval_hours: float,
    restart_hours: float,
    max_tolerated: int | None = None,
    shortest_startup: float | None = None,
) -> float:
    """Chance of missing the deadline when starting this vendor now (0 without a deadline).

    Slack is the time left beyond the work and the start-up. Each failure costs at most the
    work since the last checkpoint plus a restart, so the slack absorbs `n` failures; the
    deadline is missed when the vendor fails more often than that (Poisson, at its hazard).
    This is the "Can't Be Late" rule: cheap and risky while slack lasts, reliable once it is gone.
    `max_tolerated` caps the failures absorbed (0: a failure misses, e.g. when the budget could
    not pay for the restart). When the vendor's start-up (its learned mean) does not fit but
    the work does, the miss is not certain unless every start-up seen there (`shortest_startup`:
    the shortest, None before any is seen) was too long (`_late_start_miss`).
    """
    if hours_left is None:
        return 0.0
    slack = hours_left - startup_hours - work_hours
    if slack < -EPS:
        return _late_start_miss(hazard, work_hours, startup_hours, hours_left, shortest_startup)
    tolerated = math.floor(max(slack, 0.0) / max(interval_hours + restart_hours, EPS))
    if max_tolerated is not None:
        tolerated = min(tolerated, max_tolerated)
    mean = max(hazard, 0.0) * (startup_hours + work_hours)
    term = math.exp(-mean)
    within = 0.0
    for i in range(min(tolerated, 200) + 1):
        within += term
        term *= mean / (i + 1)
    return min(max(1.0 - within, 0.0), 1.0)


def _late_start_miss(
    hazard: float,
    work_hours: float,
    startup_hours: float,
    hours_left: float,
    shortest: float | None = None,
) -> float:
    """Chance of a miss when the expected start-up does not fit before the deadline but the
    work alone does. Start-ups vary from start to start, so a shorter one may fit: read as a
    chance growing with the time left for it (from the `shortest` seen at the vendor, or from
    nothing where none was seen and the figure is a guess), and then no failure may come.
    Priced as certain (1.0) every vendor tied and the cheapest, flakiest one got the last
    chance of a job after a failure; a fit read off a guessed 0.1 h at a vendor seen starting
    in exactly 0.1 h every time bet deadlines on a start-up that never comes."""
    room = hours_left - work_hours
    if room < -EPS or startup_hours <= 0:
        return 1.0
    if shortest is None:  # no start-up seen there: the usual one is a guess
        fits = min(max(room / startup_hours, 0.0), 1.0)
    elif startup_hours - shortest > EPS:  # seen from `shortest` up: one as short may come
        fits = min(max((room - shortest) / (startup_hours - shortest), 0.0), 1.0)
    else:  # every start-up seen there took as long: none shorter will come
        fits = 1.0 if room >= startup_hours - EPS else 0.0
    mean = max(hazard, 0.0) * (room + work_hours)
    return min(max(1.0 - fits * math.exp(-mean), 0.0), 1.0)
