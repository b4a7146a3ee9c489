"""A user stops a run: the request is recorded at once (by anyone: API, CLI, dashboard), and the
run's next tick carries it out: it cancels the active job at its vendor, starts no new payment,
lets a payment in flight be reconciled as usual, and ends the run `cancelled` with who and why.

The request and its execution are apart so that a cancel never races a tick: only the holder of
the run's lease touches its jobs and payments. A crash between the vendor's cancel and its record
only means the next tick sends the (idempotent) cancel again.
"""

from __future__ import annotations

from sqlalchemy import update

from procure.agent.context import PlanContext
from procure.agent.deps import OBS, AgentDeps, RunNotFound, TickResult
from procure.agent.outcomes import paid_for
from procure.agent.reconcile import reconcile
from procure.crashpoints import crash_point
from procure.models import (
    TERMINAL_RUN_STATUSES,
    Job,
    JobStatus,
    PaymentStatus,
    Run,
    RunStatus,
    format_usd,
    utcnow,
)
from procure.store import Store, leases, repo
from procure.store.tables import RunRow
from procure.vendors.client import VendorError


class CannotCancel(Exception):
    """The run has already ended otherwise (completed, failed, aborted)."""


def request_cancel(store: Store, run_id: str, *, by: str, reason: str | None = None) -> Run:
    """Record that `by` wants the run stopped (idempotent: a second request changes nothing).
    Returns the run as it now is. Raises `RunNotFound`, or `CannotCancel` if it already ended
    other than cancelled."""
    why = f"cancelled by {by}" + (f": {reason}" if reason else "")
    with store.session() as s:
        now = utcnow()
        # Conditional, so that of two concurrent requests one records it, and a run a tick just
        # ended is not marked.
        recorded = s.execute(
            update(RunRow)
            .where(
                RunRow.id == run_id,
                RunRow.status == RunStatus.running,
                RunRow.cancel_requested_at.is_(None),
            )
            .values(
                cancel_requested_at=now,
                cancel_reason=why,
                next_tick_at=leases.store_now(s),  # due by the store's clock, as leases compare
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if recorded:
            repo.add_observation(
                s, run_id, OBS.agent_reasoning, f"Cancel requested: {why}. No new payment starts"
            )
        run = repo.get_run(s, run_id)
    if run is None:
        raise RunNotFound(run_id)
    if run.status in TERMINAL_RUN_STATUSES and run.status != RunStatus.cancelled:
        raise CannotCancel(f"run {run_id} already {run.status}: there is nothing to cancel")
    return run


async def carry_out(
    deps: AgentDeps, ctx: PlanContext, active: Job | None, *, give_up: bool = False
) -> TickResult:
    """The tick of a run whose cancel was requested. `give_up`: the vendor has not confirmed
    the cancel in `max_troubles` tries; end the run anyway, saying so."""
    run = ctx.state.run
    if active is not None and active.status == JobStatus.submitted:
        # A payment in flight: reconcile it as usual, but never submit it again.
        vendor = ctx.vendor(active.vendor_id)
        if vendor is not None:
            return await reconcile(deps, ctx, active, vendor, resubmit=False)
    if active is not None and active.status == JobStatus.running and not give_up:
        vendor = ctx.vendor(active.vendor_id)
        if vendor is not None and active.vendor_job_id:
            try:
                await deps.vendors.cancel(vendor, active.vendor_job_id)
            except VendorError as exc:
                if exc.retryable:  # down or 5xx: it may still run; ask again next tick
                    with deps.store.session() as s:
                        repo.add_observation(
                            s,
                            run.id,
                            OBS.error,
                            f"{vendor.vendor_id} cancel-job {exc}; will ask again",
                            vendor_id=vendor.vendor_id,
                        )
                    return TickResult("Vendor error")
                # Turned down for good (it no longer knows the job, or it already ended).
                note = f"{vendor.vendor_id} answered the cancel with: {exc}"
            else:
                note = f"Job {active.vendor_job_id} cancelled at {vendor.vendor_id}"
            crash_point("cancel_sent")
        else:
            note = f"Job {active.vendor_job_id} dropped: {active.vendor_id} left the registry"
    elif active is not None and active.status == JobStatus.submitted:
        # Its vendor left the registry (else it was reconciled above): no cancel was asked for,
        # and its payment stays pending until settle_ended_runs finds it used or expired.
        note = _dropped_in_submission(ctx, active)
    elif active is not None:
        note = (
            f"{active.vendor_id} did not confirm the cancel of job {active.vendor_job_id} "
            f"after {deps.max_troubles} tries; the run ends without it"
        )
    else:
        note = None
    _record_cancelled(deps, ctx, active, note)
    return TickResult("Run cancelled")


def _dropped_in_submission(ctx: PlanContext, job: Job) -> str:
    """What became of a job still being submitted to a vendor no longer in the registry."""
    pending = sum(
        p.amount
        for p in ctx.state.payments
        if p.job_id == job.id and p.status == PaymentStatus.pending
    )
    money = (
        f"; its payment of {format_usd(pending)} stays pending (counted against the budget) "
        "until the ledger shows it settled or its authorisation expires unused"
        if pending
        else ""
    )
    return (
        f"Job {job.id} dropped while still being submitted: {job.vendor_id} left the registry, "
        f"so it was neither reconciled nor cancelled there{money}"
    )


def _record_cancelled(
    deps: AgentDeps, ctx: PlanContext, active: Job | None, note: str | None
) -> None:
    run = ctx.state.run
    why = run.cancel_reason or "cancelled"
    with deps.store.session() as s:
        if active is not None:
            repo.update_job(
                s,
                active.id,
                status=JobStatus.cancelled,
                error_message=why,
                actual_cost=paid_for(ctx, active),
                completed_at=utcnow(),
            )
            if note:
                repo.add_observation(s, run.id, OBS.job_event, note, vendor_id=active.vendor_id)
        repo.update_run(
            s, run.id, status=RunStatus.cancelled, status_reason=why[0].upper() + why[1:]
        )
        repo.add_observation(
            s,
            run.id,
            OBS.agent_reasoning,
            f"Run {why}; {ctx.state.run.progress:.0%} done, "
            f"budget remaining {format_usd(run.budget_remaining)}",
        )
