"""Pay as you go: how much of a job is paid for, and when the next slice must be bought.

A job paid in slices buys `slice_hours` at a time; the vendor stops it when its paid time runs
out, so the tick renews when `RENEW_FRACTION` of a slice is left. A failure then loses at most
the current slice (and the next one, if it was bought in the last stretch). Pure functions of a
job and its payments, shared by the tick and the market simulator.
"""

from __future__ import annotations

from procure.models import Job, Payment, PaymentStatus

RENEW_FRACTION = 0.1
"""Renew when this much of a slice is left: enough for a poll and a payment to happen."""
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


def renewal_due(job: Job, paid: float, progress: float) -> bool:
    """Whether a sliced job at `progress` should buy its next slice now."""
    if job.slice_hours is None or next_slice_hours(job, paid) <= EPS:
        return False
    paid_left = (paid_until(job, paid) - progress) * total_hours(job)
    return paid_left <= RENEW_FRACTION * job.slice_hours + EPS


def job_shape(
    remaining_hours: float, action_hours: float | None, slice_hours: float | None
) -> tuple[float, float | None]:
    """(hours the job runs, hours per payment or None for all at once) for a planner's action:
    never more than the work left, and no slicing when one slice would cover the job."""
    hours = min(action_hours or remaining_hours, remaining_hours)
    if slice_hours is None or slice_hours >= hours - EPS:
        return hours, None
    return hours, slice_hours
