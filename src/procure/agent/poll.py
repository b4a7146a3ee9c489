"""Watching a running job: poll the vendor, keep its log lines and checkpoint, complete, fail or
stop the job, and buy the next slice when it is due."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from sqlalchemy.orm import Session

from procure.agent import joblogs, runlog, slices
from procure.agent.context import (
    PlanContext,
    StartupsSeen,
    deadline_passed,
    start_read,
    startups_seen,
)
from procure.agent.deps import EPS, OBS, AgentDeps, TickResult
from procure.agent.outcomes import (
    fail_job,
    gpu_hours_run,
    may_be_unbooked,
    paid_for,
    stop_job,
    vendor_trouble,
)
from procure.agent.renewals import renew, retry_slice, settle_in_doubt
from procure.crashpoints import crash_point
from procure.models import (
    Job,
    JobStatus,
    Payment,
    PaymentStatus,
    RunStatus,
    Vendor,
    utcnow,
)
from procure.store import hotpath, repo
from procure.store.hotpath import PollWrite
from procure.vendors.client import VendorError
from procure.vendors.protocol import VendorJob
from procure.warnings import check_run


def _implausible(job: Job, vjob: VendorJob) -> str | None:
    """Why the vendor's report of a job cannot be true, or None."""
    if vjob.progress < job.progress - 0.01:
        return f"reported progress went back from {job.progress:.0%} to {vjob.progress:.0%}"
    if vjob.status == "completed" and vjob.progress < 1 - EPS:
        return f"reported the job completed at {vjob.progress:.0%} progress"
    return None


# How many of the jobs most recently seen running (of any run) the planner learns start-ups from:
# enough for each vendor in use to show several, few enough to read in one bounded query.
STARTUPS_READ = 200


def learned_startups(s: Session) -> dict[str, StartupsSeen]:
    """The start-ups seen per vendor, read before a plan (never on a plain poll)."""
    return startups_seen(repo.recent_startups(s, STARTUPS_READ))


def full_context(deps: AgentDeps, ctx: PlanContext) -> PlanContext:
    """`ctx` with every vendor, this run's error counts and the vendors' learned start-ups, for
    a poll that must plan."""
    with deps.store.session() as s:
        vendors = repo.list_vendors(s)
        errors = repo.vendor_error_counts(s, ctx.state.run.id)
        startups = learned_startups(s)
    return replace(ctx, vendors=vendors, errors_by_vendor=errors, startups=startups)


async def poll(
    deps: AgentDeps,
    ctx: PlanContext,
    job: Job,
    vendor: Vendor,
    *,
    partial: bool = False,
    sink: list[PollWrite] | None = None,
) -> TickResult:
    """Poll a running job. `partial`: `ctx` holds only the job's vendor and no error counts
    (enough to poll); the rest is loaded before anything that plans. `sink`: a plain poll (the
    job runs on, nothing else to do) appends its write there for the worker to write in its
    batch, instead of writing it now (`procure.store.hotpath`)."""
    run = ctx.state.run  # every payment is followed by a poll: the budget warning is noticed here
    check_run(deps.store, run.id, run.budget_total, run.budget_remaining, deps.spend_caps.warn_at)
    pending = next(
        (p for p in ctx.state.payments if p.job_id == job.id and p.status == PaymentStatus.pending),
        None,
    )
    if pending is not None and not pending.error_message and pending.ask_again_at is None:
        return await retry_slice(deps, job, pending, vendor)  # a slice bought before a crash
    if pending is not None and await settle_in_doubt(deps, job, pending, vendor) is None:
        # Settled or expired just now: this tick's payments are stale (a renewal judged on them
        # would buy the same hours again); the next tick polls with its fate known.
        return TickResult("Slice payment settled or expired")
    try:
        vjob = await deps.vendors.status(vendor, vendor_job_id=job.vendor_job_id)
    except VendorError as exc:
        vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    crash_point("polled")
    if vjob is None:
        return fail_job(deps, job, vendor, f"{vendor.vendor_id} has no record of the job")
    now = utcnow()
    advanced = vjob.progress > job.progress + EPS
    # The cursor counts the job's lines at the vendor; one that shows only its last lines says
    # where they start (`logs_offset`), so none is read twice or skipped for good.
    start = vjob.logs_offset or 0
    kept = joblogs.keep(vjob.logs[max(0, job.log_cursor - start) :], ctx.state.run.log_lines)
    saved_url, saved = job.checkpoint_url, job.checkpoint_progress
    # A checkpoint past the progress the vendor reports is not believed.
    offered = min(vjob.checkpoint_progress or 0.0, vjob.progress)
    if vjob.checkpoint_url and offered > saved + EPS:
        saved_url, saved = vjob.checkpoint_url, offered
    lie = _implausible(job, vjob)
    write = PollWrite(
        run_id=job.run_id,
        job_id=job.id,
        log_cursor=max(job.log_cursor, start + len(vjob.logs)),  # never back: no line twice
        progress=max(vjob.progress, job.progress),
        checkpoint_url=saved_url,
        checkpoint_progress=saved,
        # A job the vendor has queued again (an instance lost, another booting) is not
        # stalling: the stall clock starts again once it runs.
        progressed_at=now if advanced or vjob.status == "queued" else job.progressed_at,
        log_lines=kept.counted,
        observations=[(OBS.job_log, line, vendor.vendor_id) for line in kept.lines]
        + [(OBS.job_event, note, vendor.vendor_id) for note in kept.notes],
        started_at=job.started_at or _start_seen(job, vjob, now),
    )
    if saved > job.checkpoint_progress + EPS:
        write.observations.append(
            (
                OBS.job_event,
                f"Checkpoint at {saved:.0%} saved at {vendor.vendor_id}: {saved_url}",
                vendor.vendor_id,
            )
        )
    paid = slices.paid_hours(job, ctx.state.payments)
    stalled_s = (
        (now - (job.progressed_at or job.created_at)).total_seconds()
        if vjob.status == "running" and not advanced
        else 0.0
    )
    ends_at = vjob.paid_until if vjob.status == "running" else None  # a queued job: no clock
    due = slices.renewal_due(job, paid, vjob.progress, ends_at, now)
    plain = (
        vjob.status == "running"
        and lie is None
        and stalled_s <= deps.stall_s
        and (pending is not None or not due)
    )
    if plain and sink is not None:
        sink.append(write)
        return _running(vjob, pending)
    with deps.store.session() as s:
        hotpath.apply_polls(s, [write])
        if vjob.status == "completed" and lie is None:
            repo.update_job(
                s,
                job.id,
                status=JobStatus.completed,
                metrics=vjob.metrics,
                artifact_url=vjob.artifact_url,
                actual_cost=paid_for(ctx, job),
                completed_at=now,
            )
            # A slice payment still in doubt keeps the run open until its fate is known.
            done = pending is None
            repo.update_run(
                s, job.run_id, progress=1.0, **({"status": RunStatus.completed} if done else {})
            )
            repo.record_vendor_outcome(
                s, vendor.vendor_id, success=True, gpu_hours=gpu_hours_run(job, 1.0)
            )
            repo.add_observation(
                s,
                job.run_id,
                OBS.job_event,
                f"Job {vjob.job_id} completed at {vendor.vendor_id}: "
                f"{runlog.readable(vjob.metrics)}; artifact {vjob.artifact_url or 'none'}",
                vendor_id=vendor.vendor_id,
            )
            return TickResult("Job completed")
    job = job.model_copy(update={"checkpoint_url": saved_url, "checkpoint_progress": saved})
    if lie is not None:  # the vendor's account cannot be true: resume elsewhere
        return fail_job(deps, job, vendor, lie, progress=job.progress, ctx=ctx)
    if stalled_s > deps.stall_s:
        why = (
            f"no progress for {stalled_s:,.0f}s "
            f"(stuck at {vjob.progress:.0%}; PROCURE_STALL_S={deps.stall_s:g})"
        )
        return fail_job(deps, job, vendor, why, progress=vjob.progress, ctx=ctx)
    if vjob.status in ("failed", "cancelled"):
        reason = vjob.error or f"job {vjob.status} by the vendor"
        return fail_job(deps, job, vendor, reason, progress=vjob.progress, ctx=ctx)
    if pending is not None and (vjob.status != "expired" or pending.ask_again_at is not None):
        # A slice in doubt: buy no other until its fate is known; one its vendor is settling
        # keeps the job past its paid time too (settled, the vendor runs the job on).
        return _running(vjob, pending)
    if vjob.status == "expired" and _owes_time(deps, job, vjob, paid, ctx.state.payments):
        return _running(vjob, pending)
    if vjob.status == "expired" and _ran_little(job, vjob, paid):
        why = (
            f"it says the job's paid time ran out at {vjob.progress:.0%}, though it was paid "
            f"to {slices.paid_until(job, paid):.0%}"
        )
        return fail_job(deps, job, vendor, why, progress=vjob.progress, ctx=ctx)
    if vjob.status == "expired":  # its paid time ran out before another slice was bought
        return stop_job(deps, ctx, job, vendor, vjob, "its paid time ran out")
    if due and late(ctx):
        if vjob.progress >= slices.paid_until(job, paid) - EPS:  # at its paid checkpoint
            return stop_job(deps, ctx, job, vendor, vjob, "the run's deadline passed")
        return _not_renewed_late(deps, ctx, job, vendor)
    if due:
        limit = slices.paid_until(job, paid)
        if partial:
            ctx = full_context(deps, ctx)
        move = deps.reconsider(ctx, job, limit) if deps.reconsider else None
        if move is None:
            return await renew(deps, ctx, job, vendor, paid)
        if vjob.progress >= limit - EPS:  # it has reached its paid checkpoint: let it go
            return stop_job(deps, ctx, job, vendor, vjob, move)
    return _running(vjob, pending)


def _start_seen(job: Job, vjob: VendorJob, now: datetime) -> datetime | None:
    """When the job's start-up ended, for the first poll that finds it running (or finds it has
    worked: one polled only once it had ended), kept once (`started_at`); None before, or where
    the poll came too late to tell (`context.start_read`)."""
    if not (vjob.status == "running" or vjob.progress > job.start_progress + EPS):
        return None
    if job.progressed_at is not None and job.progress > job.start_progress + EPS:
        return None  # a poll saw it working before, too late to tell when it started
    # Until a poll sees the job working, its `progressed_at` moves only at a poll that finds it
    # queued: the last moment it was known not to run. (A window that was too wide at one poll
    # is wider at the next: a late poll's start-up is never read by a later one.)
    return start_read(job.created_at, job.progressed_at or job.created_at, now)


def late(ctx: PlanContext) -> bool:
    """Whether the run's deadline has passed: it buys nothing more (as the cloud path rents
    nothing more and stops its instance there); the run ends `aborted` at its next plan."""
    return deadline_passed(ctx.state.run)


def _not_renewed_late(deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor) -> TickResult:
    """The job runs out the time already paid for (it ends on its checkpoint); no slice more."""
    why = (
        f"Not buying the next slice at {vendor.vendor_id}: the run's deadline passed at "
        f"{ctx.state.run.deadline:%Y-%m-%d %H:%M:%S} UTC; the job runs out its paid time"
    )
    with deps.store.session() as s:
        if why not in repo.recent_contents(s, job.run_id):  # said once, not every tick
            repo.add_observation(s, job.run_id, OBS.agent_reasoning, why, vendor_id=job.vendor_id)
    return TickResult("Slice not bought: the run's deadline passed")


def _owes_time(
    deps: AgentDeps, job: Job, vjob: VendorJob, paid: float, payments: list[Payment]
) -> bool:
    """The vendor says the job's paid time ran out, yet it was paid for more than the job ran
    and the last slice settled just now: it may not have booked that slice yet."""
    if slices.paid_until(job, paid) <= vjob.progress + EPS:
        return False
    done = [p for p in payments if p.job_id == job.id and p.status == PaymentStatus.completed]
    last = max(done, key=lambda p: p.updated_at, default=None)
    return last is not None and may_be_unbooked(deps, last)


def _ran_little(job: Job, vjob: VendorJob, paid: float) -> bool:
    """Whether the job ran under half of what it was paid for at this vendor: a seller that
    sells wall time may honestly end a job that ran slower than planned (a boot, a slow node),
    but not one that hardly ran; that one is the vendor's failure (cool-down, resume elsewhere),
    or the planner would pay it again and again."""
    bought = slices.paid_until(job, paid) - job.start_progress
    return vjob.progress - job.start_progress < bought / 2 - EPS


def _running(vjob: VendorJob, pending: Payment | None) -> TickResult:
    if pending is not None:
        return TickResult(f"Job running ({vjob.progress:.0%}); a slice payment is in doubt")
    return TickResult(f"Job running ({vjob.progress:.0%})")
