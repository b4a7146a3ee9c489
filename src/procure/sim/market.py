"""The simulated market: vendors with prices and hidden failure hazards, and seeded jobs.

Each job lives on its own clock (hours since it was submitted). What the market will do to it is
fixed by the seed, so every policy meets the same market and the oracle can know it in
hindsight: each vendor's failure times (a Poisson process at its true hazard: a job running
there when one comes is lost), drawn lazily from the vendor's own stream for as long as anyone
asks, never cut at a horizon, and, per quarter hour, whether the vendor has capacity.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from dataclasses import dataclass, replace

from procure.models import usd_to_micros

CAPACITY_PERIOD_HOURS = 0.25  # capacity is re-drawn this often
HORIZON_FACTOR = 8.0  # no job starts after this many times its length (+ a day): given up


@dataclass(frozen=True)
class VendorSpec:
    vendor_id: str
    price_per_hour: int  # micro-USD
    hazard: float  # true failures per hour; hidden from every policy but the oracle
    advertised: float  # the registry's reliability score: what policies are told
    refuse_rate: float  # chance that a start is refused for lack of capacity
    startup_hours: float  # from payment to a running job


@dataclass(frozen=True)
class Market:
    name: str
    vendors: tuple[VendorSpec, ...]
    payment_fee: int  # micro-USD charged on every payment
    deadline_slack: float | None = None  # deadline = start-up + hours * (1 + slack), if set
    cooldown_hours: float = 300 / 3600  # the agent's VENDOR_COOLDOWN_S, in hours


@dataclass(frozen=True)
class JobCase:
    index: int
    hours: float
    checkpoint_every: float  # fraction of the job between checkpoints
    deadline_hours: float | None
    horizon_hours: float  # no new job after this; one already running goes on (and may fail)
    failures: dict[str, Failures]  # vendor id -> its failure times
    capacity_seed: int

    def has_capacity(self, spec: VendorSpec, at_hours: float) -> bool:
        bucket = math.floor(at_hours / CAPACITY_PERIOD_HOURS)
        digest = hashlib.blake2b(
            f"{self.capacity_seed}:{spec.vendor_id}:{bucket}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64 >= spec.refuse_rate


def charge(price_per_hour: int, hours: float) -> int:
    """What a vendor bills for `hours`: rounded up to the micro-dollar, so that billing one
    stretch in pieces never costs less than billing it whole."""
    return math.ceil(price_per_hour * hours - 1e-6)


def _vendor(
    vid: str, price: str, hazard: float, adv: float, refuse: float, up: float
) -> VendorSpec:
    return VendorSpec(vid, usd_to_micros(price), hazard, adv, refuse, up)


# Cheap vendors are flaky and say otherwise; dear ones are steady. Hazards are per GPU-hour:
# 0.35/h is a spot-like market (a failure every ~3 hours), 0.002/h a steady cloud.
FAILURE_HEAVY = Market(
    name="failure-heavy",
    vendors=(
        _vendor("bargain", "1.00", 0.35, 0.95, 0.15, 0.10),
        _vendor("discount", "1.10", 0.20, 0.92, 0.10, 0.15),
        _vendor("budget", "1.25", 0.08, 0.90, 0.10, 0.10),
        _vendor("standard", "1.45", 0.03, 0.95, 0.05, 0.08),
        _vendor("steady", "1.90", 0.01, 0.98, 0.03, 0.05),
        _vendor("premium", "2.40", 0.002, 0.995, 0.0, 0.05),
    ),
    payment_fee=usd_to_micros("0.005"),
)

CALM = replace(
    FAILURE_HEAVY,
    name="calm",
    vendors=tuple(
        replace(v, hazard=v.hazard / 20, refuse_rate=v.refuse_rate / 3)
        for v in FAILURE_HEAVY.vendors
    ),
)

DEADLINE_TIGHT = replace(FAILURE_HEAVY, name="deadline-tight", deadline_slack=0.15)

SCENARIOS: dict[str, Market] = {m.name: m for m in (CALM, FAILURE_HEAVY, DEADLINE_TIGHT)}


class Failures:
    """One vendor's failure times for one job: a Poisson process at `rate`, drawn from its own
    seeded stream as far as it is asked about (so the order of questions never changes it)."""

    def __init__(self, seed: str, rate: float) -> None:
        self.rate = rate
        self._rng = random.Random(seed)
        self._times: list[float] = []

    def _cover(self, t: float) -> None:
        while self.rate > 0 and (not self._times or self._times[-1] <= t):
            last = self._times[-1] if self._times else 0.0
            self._times.append(last + self._rng.expovariate(self.rate))

    def index_after(self, t: float) -> int:
        """The index of the first failure strictly after `t`."""
        self._cover(t)
        return bisect.bisect_right(self._times, t)

    def time(self, index: int) -> float:
        """The `index`-th failure time (from 0), or infinity for a vendor that never fails."""
        if self.rate <= 0:
            return math.inf
        while len(self._times) <= index:
            self._cover(self._times[-1] if self._times else 0.0)
        return self._times[index]

    def after(self, t: float) -> float:
        return self.time(self.index_after(t))

    def upto(self, t: float) -> list[float]:
        """Every failure at or before `t`."""
        return self._times[: self.index_after(t)]


def make_jobs(market: Market, count: int, seed: int) -> list[JobCase]:
    """`count` jobs of varied length (median 4 GPU-hours, 0.5 to 24) with checkpoints every
    6 to 18 minutes of work, and the market's failures and capacity for each."""
    rng = random.Random(f"{seed}:{market.name}")
    jobs = []
    for index in range(count):
        hours = round(min(24.0, max(0.5, rng.lognormvariate(math.log(4.0), 0.7))), 2)
        every = min(0.25, max(1 / 64, rng.uniform(0.1, 0.3) / hours))
        horizon = hours * HORIZON_FACTOR + 24
        deadline = None
        if market.deadline_slack is not None:
            fastest = min(v.startup_hours for v in market.vendors)
            deadline = fastest + hours * (1 + market.deadline_slack)
        stream = rng.getrandbits(64)
        failures = {
            v.vendor_id: Failures(f"{stream}:{v.vendor_id}", v.hazard) for v in market.vendors
        }
        jobs.append(JobCase(index, hours, every, deadline, horizon, failures, rng.getrandbits(32)))
    return jobs


def next_failure(job: JobCase, vendor_id: str, after: float) -> float:
    """The first failure of `vendor_id` strictly after `after`, or infinity."""
    return job.failures[vendor_id].after(after)
