"""Pay as you go: how much of a job is paid for, and when the next slice must be bought.

A job paid in slices buys `slice_hours` at a time; the vendor stops it when its paid time runs
out, so the tick renews when `RENEW_FRACTION` of a slice is left. A failure then loses at most
the current slice (and the next one, if it was bought in the last stretch). Pure functions of a
job and its payments, shared by the tick and the market simulator.

A vendor that has not proven itself (`proven`) is first paid for a short slice (`first_slice`):
a run cancelled, or a vendor that dies, moments after the start costs that much, not a whole
slice. Once half of it has run, the normal slices follow (`renewal_due`).
"""

from __future__ import annotations

from datetime import datetime

from procure.models import Job, JobStatus, Payment, PaymentStatus, Vendor

RENEW_FRACTION = 0.1
"""Renew when this much of a slice is left: enough for a poll and a payment to happen."""
PROBE_RENEW_FRACTION = 0.5
# A renewal by the vendor's clock needs this share of the work the earlier slices paid for.
CLOCK_WORK_SHARE = 0.5
"""A short first slice is renewed once this much of it is left: half of it run is the proof."""
MIN_SLICE_HOURS = 1 / 60
"""No payment buys less than a minute of work (as `start_request.MIN_HOURS`)."""
EPS = 1e-9


def job_hours(job: Job) -> float:
    """GPU-hours this job is to run (the work left when it started)."""
    return float(job.job_params.get("hours", 1.0))


def total_hours(job: Job) -> float:
    """GPU-hours of the whole run's work, against which progress is measured."""
    return float(job.job_params.get("totalHours") or job_hours(job))


def paid_hours(job: Job, payments: list[Payment]) -> float:
    """GPU-hours of this job already paid for (completed payments)."""
    return sum(
        p.hours if p.hours is not None else job_hours(job)
        for p in payments
        if p.job_id == job.id and p.status == PaymentStatus.completed
    )


def paid_until(job: Job, paid: float) -> float:
    """The run progress at which the job's paid time runs out."""
    return min(1.0, job.start_progress + paid / total_hours(job))


def next_slice_hours(job: Job, paid: float) -> float:
    """Hours the next payment should buy: a slice, or what is left of the job if less."""
    left = job_hours(job) - paid
    if left <= EPS:
        return 0.0
    return min(job.slice_hours or left, left)


def first_slice_of(job: Job) -> float | None:
    """Hours of the job's short first slice (`first_slice`), or None if it had none."""
    first = job.job_params.get("firstSliceHours")
    return float(first) if isinstance(first, int | float) and first > 0 else None


def renewal_due(
    job: Job,
    paid: float,
    progress: float,
    ends_at: datetime | None = None,
    now: datetime | None = None,
) -> bool:
    """Whether a sliced job at `progress` should buy its next slice now: its paid share of the
    work nearly done, or, for a vendor that ends a running job by the clock (`ends_at`: pass it
    only for a job running now), its paid time nearly up (a job slower than planned would
    otherwise be stopped mid-slice) once the job has done half the work of the slices before
    its current one (as `_ran_little` judges a vendor): a job at half its planned speed or more
    is never cut off, and a vendor's clock never buys slices far ahead of the work it shows."""
    if job.slice_hours is None or next_slice_hours(job, paid) <= EPS:
        return False
    if ends_at is not None and now is not None:
        left_s = (ends_at - now).total_seconds()
        before = paid_until(job, max(0.0, paid - job.slice_hours)) - job.start_progress
        reached = progress - job.start_progress + EPS >= CLOCK_WORK_SHARE * before
        if reached and left_s <= RENEW_FRACTION * job.slice_hours * 3600 + EPS:
            return True
    paid_left = (paid_until(job, paid) - progress) * total_hours(job)
    first = first_slice_of(job)
    if first is not None and paid <= first + EPS:  # still on its short first slice
        return paid_left <= PROBE_RENEW_FRACTION * first + EPS
    return paid_left <= RENEW_FRACTION * job.slice_hours + EPS


def proven(vendor: Vendor, jobs: list[Job]) -> bool:
    """Whether `vendor` has shown that it does the work it is paid for: a job completed for
    procure (its learned successes, any run), or a job of this run (`jobs`) that ran on it
    without failing."""
    if vendor.successes > 0:
        return True
    return any(
        j.vendor_id == vendor.vendor_id
        and j.status != JobStatus.failed
        and j.progress > j.start_progress + EPS
        for j in jobs
    )


def first_slice(hours: float, slice_hours: float | None, fraction: float) -> float | None:
    """Hours the first payment to an unproven vendor buys: `fraction` of the normal first
    payment (a slice, or the whole job when paid at once), at least `MIN_SLICE_HOURS`; None
    when that would not be shorter than the normal one, or would leave less than
    `MIN_SLICE_HOURS` of it to buy next (no payment buys less than a minute)."""
    normal = slice_hours or hours
    short = max(normal * fraction, MIN_SLICE_HOURS)
    return short if normal - short >= MIN_SLICE_HOURS - EPS else None


def job_shape(
    remaining_hours: float, action_hours: float | None, slice_hours: float | None
) -> tuple[float, float | None]:
    """(hours the job runs, hours per payment or None for all at once) for a planner's action:
    never more than the work left, and no slicing when one slice would cover the job."""
    hours = min(action_hours or remaining_hours, remaining_hours)
    if slice_hours is None or slice_hours >= hours - EPS:
        return hours, None
    return hours, slice_hours
