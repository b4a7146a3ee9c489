"""The hindsight oracle: the cheapest way through one job, knowing every failure time.

Knowing when each vendor will fail, the oracle never loses work: it runs a vendor only between
its failures, and pays exactly for the checkpoint intervals that fit before the next one (a slice
the vendor stops at a checkpoint), one payment per stretch. It ignores capacity refusals. Every
policy's history is one of the schedules it searches (or costs more than one: a policy pays for
lost work, unused time and more payments), so its cost is a lower bound on any policy's cost for
the same job, among policies that finish by the deadline.

The search is A* over (checkpoints done, time), priced at the cheapest vendor's rate for the work
left (admissible), keeping only (time, cost) labels that no earlier, cheaper one dominates. A
stretch starts now or right after one of the vendor's next failures (starting later inside the
same failure-free window never helps), up to the first window that holds all the work left.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass

from procure.agent.costmodel import intervals
from procure.sim.market import JobCase, Market, charge


class Unfinishable(Exception):
    """No schedule completes the job within its horizon, even in hindsight."""


@dataclass(frozen=True)
class OracleResult:
    cost: int  # micro-USD
    finish_hours: float
    on_time: bool
    segments: int


def _search(
    market: Market, job: JobCase, work: list[float], deadline: float | None
) -> tuple[int, float, int] | None:
    """(cost, finish time, stretches) of the cheapest schedule ending by `deadline`, or None."""
    cum = list(itertools.accumulate(work, initial=0.0))
    total = len(work)
    cheapest = min(v.price_per_hour for v in market.vendors)
    # A policy may start a job until the horizon and run it to the end: the oracle may too.
    latest = job.horizon_hours + max(v.startup_hours for v in market.vendors) + job.hours
    limit = latest if deadline is None else min(deadline, latest)
    fee = market.payment_fee

    def bound(m: int) -> float:
        return 0.0 if m == total else cheapest * (cum[total] - cum[m]) + fee

    counter = itertools.count()
    # (cost + bound, time, tie-break, checkpoints done, stretches, cost)
    heap: list[tuple[float, float, int, int, int, int]] = [(bound(0), 0.0, next(counter), 0, 0, 0)]
    settled: dict[int, list[tuple[float, int]]] = {}
    eps = 1e-9
    while heap:
        _f, t, _n, m, stretches, g = heapq.heappop(heap)
        if m == total:
            return g, t, stretches
        labels = settled.setdefault(m, [])
        if any(lt <= t + eps and lg <= g for lt, lg in labels):
            continue
        labels.append((t, g))
        left = cum[total] - cum[m]
        for spec in market.vendors:
            failures = job.failures[spec.vendor_id]
            first = failures.index_after(t)  # the vendor's next failure
            i = first - 1
            while True:
                start = t if i < first else failures.time(i) + eps
                if start > limit:
                    break
                window_end = failures.time(i + 1)
                begin = start + spec.startup_hours
                room = min(window_end, limit) - begin
                if room > eps:
                    n_max = bisect.bisect_right(cum, cum[m] + room + eps) - 1 - m
                    for n in range(1, min(n_max, total - m) + 1):
                        hours = cum[m + n] - cum[m]
                        cost = g + charge(spec.price_per_hour, hours) + fee
                        heapq.heappush(
                            heap,
                            (
                                cost + bound(m + n),
                                begin + hours,
                                next(counter),
                                m + n,
                                stretches + 1,
                                cost,
                            ),
                        )
                if room >= left - eps or window_end == math.inf:
                    break  # this window holds all the work left: later ones only finish later
                i += 1
    return None


def oracle(market: Market, job: JobCase) -> OracleResult:
    """The cheapest completion of `job` in hindsight; on time if the deadline allows it."""
    work = intervals(job.hours, job.checkpoint_every, 0.0)
    found = _search(market, job, work, job.deadline_hours)
    on_time = found is not None
    if found is None:  # no schedule meets the deadline: the cheapest late one
        found = _search(market, job, work, None)
    if found is None:
        raise Unfinishable(f"job {job.index} cannot be completed within its horizon")
    cost, finish, segments = found
    return OracleResult(cost=cost, finish_hours=finish, on_time=on_time, segments=segments)
