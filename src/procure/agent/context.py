"""What a planner sees of a run: its state, the vendors, and what went wrong this run; and what
procure has learned of each vendor: its reliability, its failure hazard (failures per GPU-hour)
and its start-up (hours from payment to the job running, from the jobs seen starting there).

A planner may also leave notes on the context (e.g. the LLM planner's raw answer and why it was
rejected); the tick stores them as observations of the run once the planner has returned.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from procure.models import (
    Job,
    ObservationType,
    PaymentStatus,
    Run,
    RunState,
    Vendor,
    utcnow,
)

# Beta-prior strength given to a vendor's registered reliability score, in pseudo-jobs.
PRIOR_STRENGTH = 10.0
# The registry's reliability score is read as the chance that a job of this many GPU-hours
# succeeds; that gives the prior hazard, held with the weight of PRIOR_HOURS of observation.
REFERENCE_JOB_HOURS = 1.0
PRIOR_HOURS = 10.0
DEFAULT_PAYMENT_OVERHEAD = 50_000  # micro-USD: what one more x402 payment is worth avoiding
DEFAULT_STARTUP_HOURS = 0.1  # a vendor's usual time from payment to a running job


def deadline_passed(run: Run) -> bool:
    """Whether the run's deadline has passed: from then on it buys nothing more."""
    return run.deadline is not None and utcnow() > run.deadline


def reliability(vendor: Vendor) -> float:
    """Posterior mean of the vendor's success probability: registry prior + observed outcomes."""
    alpha = vendor.reliability_score * PRIOR_STRENGTH + vendor.successes
    beta = (1 - vendor.reliability_score) * PRIOR_STRENGTH + vendor.failures
    return alpha / (alpha + beta)


def prior_hazard(vendor: Vendor) -> float:
    """Failures per GPU-hour implied by the registry's reliability score alone."""
    score = min(max(vendor.reliability_score, 0.01), 0.9999)
    return -math.log(score) / REFERENCE_JOB_HOURS


def hazard(vendor: Vendor) -> float:
    """Posterior mean of the vendor's failure rate per GPU-hour (Gamma prior + Poisson counts).

    Failures are counted against every GPU-hour the vendor ran for us, failed jobs included,
    so a vendor that dies early in long jobs and one that dies late in short ones compare fairly.
    """
    shape = prior_hazard(vendor) * PRIOR_HOURS + vendor.failures
    return shape / (PRIOR_HOURS + max(vendor.gpu_hours, 0.0))


def hours_between_failures(vendor: Vendor) -> float:
    rate = hazard(vendor)
    return math.inf if rate <= 0 else 1 / rate


@dataclass(frozen=True)
class StartupsSeen:
    """The start-ups seen at one vendor (`observed_startup` of each job seen starting)."""

    count: int = 0
    hours: float = 0.0  # summed
    shortest: float = math.inf

    def seen(self, hours: float) -> StartupsSeen:
        hours = max(hours, 0.0)
        return StartupsSeen(self.count + 1, self.hours + hours, min(self.shortest, hours))


# A start-up ends somewhere between the last poll that found the job not yet running (or its
# payment, before any) and the first that found it running. Read where that window is narrow
# (under a minute, or under a quarter of the start-up known to have passed already), at its
# middle: off by at most half the window, 30 s or an eighth of the start-up. A wider one (the
# worker was down, polls were sparse) is not read: a poll an hour late would read an hour's
# start-up at a vendor that starts in minutes, until 200 newer starts pushed it out.
START_WINDOW_S = 60.0
START_WINDOW_SHARE = 0.25


def start_read(created_at: datetime, before: datetime, seen_at: datetime) -> datetime | None:
    """When a job's start-up ended, read off the window it ended in: after `before` (the last
    poll that found it not yet running, else its creation) and by `seen_at` (the first poll that
    found it running): the window's middle, or None where the window is too wide to tell."""
    window = max((seen_at - before).total_seconds(), 0.0)
    passed = (before - created_at).total_seconds()
    if window > max(START_WINDOW_S, START_WINDOW_SHARE * passed):
        return None
    return before + (seen_at - before) / 2


def hours_to_start(created_at: datetime, started_at: datetime) -> float:
    """A job's start-up: hours from its creation (its first payment) to its start (`started_at`,
    `start_read`)."""
    return max((started_at - created_at).total_seconds() / 3600, 0.0)


def observed_startup(job: Job) -> float | None:
    """Hours from paying for `job` to its work starting: from its creation (the first payment)
    to `started_at`, read when a poll first saw it running (set once, `start_read`), whatever
    became of it since. None for a job never seen running (its start-up may not have ended) or
    first seen running too late to tell when it started. Wall time to the end less the work done
    would read 0 at a vendor that runs an hour of work in seconds."""
    return None if job.started_at is None else hours_to_start(job.created_at, job.started_at)


def startups_seen(
    started: Iterable[tuple[str, datetime, datetime]],
) -> dict[str, StartupsSeen]:
    """The start-ups per vendor id of jobs given as (vendor_id, created_at, started_at): what
    the tick reads before it plans (`repo.recent_startups`), without loading whole job rows."""
    seen: dict[str, StartupsSeen] = {}
    for vendor_id, created_at, started_at in started:
        hours = hours_to_start(created_at, started_at)
        seen[vendor_id] = seen.get(vendor_id, StartupsSeen()).seen(hours)
    return seen


def learned_startup(seen: StartupsSeen | None, usual: float = DEFAULT_STARTUP_HOURS) -> float:
    """A vendor's expected start-up: the mean of those seen there, or the usual figure until
    one is seen. Not blended with the usual figure: that is a guess, and a vendor seen starting
    in 0.3 h four times, held at a fifth of the way to 0.1 h, still looked as if a job due
    0.27 h after its work would make it (it missed)."""
    if seen is None or seen.count == 0:
        return usual
    return seen.hours / seen.count


@dataclass(frozen=True)
class PlanContext:
    state: RunState
    vendors: list[Vendor]
    errors_by_vendor: dict[str, int] = field(default_factory=dict)
    now: datetime = field(default_factory=utcnow)
    notes: list[tuple[ObservationType, str]] = field(default_factory=list, compare=False)
    """Observations the planner wants stored (type, content); the tick writes them after planning.
    Never attributed to a vendor, so they do not count as that vendor's errors this run."""
    payment_overhead: int = DEFAULT_PAYMENT_OVERHEAD
    """What each extra payment costs (fees, latency, another chance to fail), in micro-USD."""
    startup_hours: float = DEFAULT_STARTUP_HOURS
    """Expected hours from paying a vendor to the job running there, before any is seen."""
    startups: dict[str, StartupsSeen] = field(default_factory=dict)
    """Start-ups seen per vendor id (across runs); a vendor without any gets `startup_hours`."""

    @property
    def committed(self) -> int:
        """Money paid or promised (pending) in this run, in micro-USD."""
        return sum(
            p.amount
            for p in self.state.payments
            if p.status in (PaymentStatus.completed, PaymentStatus.pending)
        )

    @property
    def available(self) -> int:
        """What may still be spent: the budget less everything paid or pending."""
        return self.state.run.budget_total - self.committed

    def failures_in_run(self, vendor_id: str) -> int:
        """Trouble with a vendor this run: each failed job and vendor error is an error obs."""
        return self.errors_by_vendor.get(vendor_id, 0)

    def vendor(self, vendor_id: str | None) -> Vendor | None:
        return next((v for v in self.vendors if v.vendor_id == vendor_id), None)

    def startup_of(self, vendor: Vendor) -> float:
        """The vendor's expected start-up, learned from the jobs seen starting there."""
        return learned_startup(self.startups.get(vendor.vendor_id), self.startup_hours)

    def shortest_startup_of(self, vendor: Vendor) -> float | None:
        """The shortest start-up seen at the vendor, or None before any is seen."""
        seen = self.startups.get(vendor.vendor_id)
        return None if seen is None or seen.count == 0 else seen.shortest

    def cooling_down(self, vendor: Vendor) -> bool:
        return vendor.cooldown_until is not None and vendor.cooldown_until > self.now

    @property
    def resume_from(self) -> Job | None:
        """The job holding the run's furthest checkpoint, if any job saved one."""
        saved = [j for j in self.state.jobs if j.checkpoint_url and j.checkpoint_progress > 0]
        return max(saved, key=lambda j: j.checkpoint_progress, default=None)

    @property
    def resume_progress(self) -> float:
        job = self.resume_from
        return job.checkpoint_progress if job else 0.0

    @property
    def remaining_hours(self) -> float:
        """GPU-hours of work left after the furthest checkpoint."""
        return self.state.run.job_spec.hours * (1 - self.resume_progress)

    @property
    def hours_left(self) -> float | None:
        """Hours until the run's deadline (negative once past), or None without one."""
        deadline = self.state.run.deadline
        return None if deadline is None else (deadline - self.now).total_seconds() / 3600
