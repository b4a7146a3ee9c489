"""Money on a cloud instance: the cost of its time by the provider's billing increment, the
reservation kept one increment (and a margin) ahead of it against the run's budget and the global
spend caps, and the end: the provider's bill booked as the job's payment, in the transaction that
ends the job (`book_end`)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from procure.agent.context import PlanContext
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.agent.ledger import spend_cap_blocks
from procure.agent.outcomes import gpu_hours_run
from procure.models import (
    Job,
    JobStatus,
    OfferTerms,
    PaymentStatus,
    RunState,
    RunStatus,
    format_usd,
    utcnow,
)
from procure.store import cloud_repo, repo
from procure.store.cloud_repo import CloudInstance

JOB_TO_STATUS = {
    "completed": JobStatus.completed,
    "failed": JobStatus.failed,
    "job_failed": JobStatus.failed,  # the user's job failed on its node (its script's exit)
    "cancelled": JobStatus.cancelled,
    "stopped": JobStatus.cancelled,
}
NODE_FAILURES = 2  # the user's job failing on its node this often ends the run `failed`


def cost(terms: OfferTerms, seconds: float) -> int:
    """Micro-USD for `seconds` of the offer, each billing increment begun counted whole."""
    step = max(terms.billing_increment_s, 1)
    billed_s = math.ceil(max(seconds, 0.0) / step - 1e-9) * step
    return math.ceil(terms.price_per_hour * billed_s / 3600)


def ahead_s(deps: AgentDeps, terms: OfferTerms) -> float:
    return max(deps.cloud.reserve_ahead_s, 2.0 * terms.billing_increment_s)


def reserve(
    deps: AgentDeps, ctx: PlanContext, job: Job, inst: CloudInstance, terms: OfferTerms
) -> bool:
    """Keep money reserved ahead of the instance: extend the job's pending payment before the
    reserved time runs short. False when the budget (or a global cap) cannot take at least one
    more billing increment beyond a safety margin: the instance must be terminated now."""
    now = utcnow()
    ahead = ahead_s(deps, terms)
    margin = max(ahead / 4, float(terms.billing_increment_s))
    reserved_until = inst.reserved_until or now
    if (reserved_until - now).total_seconds() >= ahead / 2:
        return True
    started = billed_from(deps, inst, terms)
    run_id = job.run_id
    with deps.store.session() as s:
        repo.update_run(s, run_id)  # the run's write lock, as every spender takes
        state = repo.load_state(s, run_id, observations=False)
        assert state is not None
        payment = next(
            (p for p in state.payments if p.job_id == job.id and p.status == PaymentStatus.pending),
            None,
        )
        if payment is None:
            return False
        others = sum(
            p.amount
            for p in state.payments
            if p.id != payment.id and p.status in (PaymentStatus.completed, PaymentStatus.pending)
        )
        room = state.run.budget_total - others
        wanted_s = (now - started).total_seconds() + ahead
        affordable_s = seconds_within(terms, room)
        target_s = min(wanted_s, affordable_s)
        if target_s - (now - started).total_seconds() < margin:
            return False
        amount = max(cost(terms, target_s), payment.amount)
        if amount > payment.amount and spend_cap_blocks(
            deps, s, run_id, amount - payment.amount, "cloud time"
        ):
            return (reserved_until - now).total_seconds() >= margin
        repo.update_payment(s, payment.id, amount=amount, hours=target_s / 3600)
        cloud_repo.update_instance(
            s, inst.name, reserved_until=started + timedelta(seconds=target_s)
        )
    return True


def billed_from(deps: AgentDeps, inst: CloudInstance, terms: OfferTerms) -> datetime:
    """The earliest moment the instance's bill may run from, which its reservation counts from:
    its intent (before its launch) where the provider bills the boot; else where it may have
    become active, the last poll that saw it booting (or its launch): a boot, however long, is
    not reserved for where it is not billed, and the bill, from a later moment, stays within."""
    if bills_boot(deps.clouds.get(inst.provider), terms):
        return inst.created_at
    return inst.active_at or inst.launched_at or inst.created_at


def seconds_within(terms: OfferTerms, micros: int) -> float:
    """The most whole billing increments of the offer that `micros` pays for, in seconds."""
    if terms.price_per_hour <= 0:
        return math.inf
    step = max(terms.billing_increment_s, 1)
    seconds = micros * 3600 / terms.price_per_hour
    whole = math.floor(seconds / step) * step
    while whole > 0 and cost(terms, whole) > micros:
        whole -= step
    return float(whole)


def computed_bill(inst: CloudInstance, terms: OfferTerms, *, from_launch: bool = False) -> int:
    """What a provider without a billing endpoint bills (or one whose bill cannot be read):
    whole increments begun, from when the instance may have become active (`from_launch`: from
    its launch, for a provider that bills the boot) to when the provider accepted its
    terminate. Both ends err high, never low: the start is the last poll that still saw it
    booting (else the moment before its launch), so the user may be booked up to one poll
    interval (and one increment) more than billed, but is never told they spent less than the
    provider bills."""
    start = inst.launched_at if from_launch else inst.active_at or inst.launched_at
    if start is None:  # never launched: nothing to bill
        return 0
    end: datetime = inst.ended_at or utcnow()
    seconds = round(max((end - start).total_seconds(), 0.0), 3)
    step = max(terms.billing_increment_s, 1)
    return round(math.ceil(seconds / step) * step * terms.price_per_hour / 3600)


def bills_boot(client: object, terms: OfferTerms) -> bool:
    """Whether the instance's provider bills its boot (RunPod, Vast.ai: from its creation), as
    its client says; a client that does not say is taken to, unless it is Lambda's (whose rule
    `computed_bill` follows by default), so that a computed bill errs high."""
    says = getattr(client, "bills_boot", None)
    return says if isinstance(says, bool) else terms.provider != "lambda"


def failing_job(s: Session, state: RunState, job: Job, reason: str) -> str | None:
    """The user's job failed on its node (its script exited with an error): the run ends
    `failed` (why, returned) once that happened NODE_FAILURES times, or again from the same
    checkpoint. Not the cloud's fault, so no other offer would do better: renting on would only
    spend the budget an instance at a time."""
    tries = [i for i in cloud_repo.instances_of_run(s, job.run_id) if i.outcome == "job_failed"]
    start = {j.id: j.job_params.get("resumeFrom") for j in state.jobs}
    again = sum(start.get(i.job_id) == start.get(job.id) for i in tries) > 1
    if len(tries) < NODE_FAILURES and not again:
        return None
    why = (
        f"the job failed on its instance {len(tries)} times (last: {reason}); the job itself "
        "fails, not the cloud: fix it and start a new run"
    )
    repo.update_run(s, job.run_id, status=RunStatus.failed, status_reason=f"Failed: {why}")
    return why


def book_end(
    deps: AgentDeps,
    ctx: PlanContext | None,
    job: Job,
    inst: CloudInstance | None,
    billed: int,
    outcome: str,
    reason: str,
    *,
    fault: bool | None = None,
) -> TickResult:
    """One transaction: the bill booked as the job's payment (failed when nothing was billed),
    the instance terminated, the job ended, what was learned counted, the run moved on."""
    now = utcnow()
    fault = bool(inst.fault) if fault is None and inst is not None else bool(fault)
    failed_run: str | None = None
    status = JOB_TO_STATUS.get(outcome, JobStatus.failed)
    with deps.store.session() as s:
        repo.update_run(s, job.run_id)
        state = repo.load_state(s, job.run_id, observations=False)
        assert state is not None
        for p in state.payments:
            if p.job_id != job.id or p.status != PaymentStatus.pending:
                continue
            if billed > 0:
                if billed > p.amount:
                    repo.add_observation(
                        s,
                        job.run_id,
                        OBS.error,
                        f"{job.vendor_id} billed {format_usd(billed)}, more than the "
                        f"{format_usd(p.amount)} reserved",
                        vendor_id=job.vendor_id,
                    )
                repo.update_payment(s, p.id, amount=billed, status=PaymentStatus.completed)
            else:
                repo.update_payment(
                    s, p.id, amount=0, status=PaymentStatus.failed, error_message="nothing billed"
                )
        remaining = repo.refresh_budget(s, job.run_id)
        if inst is not None:
            cloud_repo.update_instance(s, inst.name, status="terminated", billed=billed)
        current = next((j for j in state.jobs if j.id == job.id), job)
        saved = max([current.checkpoint_progress] + [j.checkpoint_progress for j in state.jobs])
        repo.update_job(
            s,
            job.id,
            status=status,
            actual_cost=billed,
            completed_at=now,
            **({} if status == JobStatus.completed else {"error_message": reason[:2000]}),
        )
        hours = gpu_hours_run(current, current.progress)
        terms = OfferTerms.model_validate(inst.offer) if inst is not None else None
        if status == JobStatus.completed:
            repo.update_run(s, job.run_id, status=RunStatus.completed, progress=1.0)
            repo.record_vendor_outcome(s, job.vendor_id, success=True, gpu_hours=hours)
            if terms is not None:
                cloud_repo.learn(
                    s, terms.provider, terms.region, terms.gpu, success=True, gpu_hours=hours
                )
        else:
            if saved > 0:
                repo.update_run(s, job.run_id, progress=saved)
            if fault:
                repo.record_vendor_outcome(s, job.vendor_id, success=False, gpu_hours=hours)
            elif terms is not None:
                cloud_repo.learn(s, terms.provider, terms.region, terms.gpu, gpu_hours=hours)
            if outcome == "job_failed":
                failed_run = failing_job(s, state, job, reason)
            if outcome == "cancelled":
                why = state.run.cancel_reason or "cancelled"
                repo.update_run(
                    s,
                    job.run_id,
                    status=RunStatus.cancelled,
                    status_reason=why[0].upper() + why[1:],
                )
        where = f"instance {inst.name} terminated; " if inst is not None else ""
        kept = (
            f"; the checkpoint at {saved:.0%} is kept"
            if saved > 0 and status != JobStatus.completed
            else ""
        )
        repo.add_observation(
            s,
            job.run_id,
            OBS.payment_event,
            f"{where}job {status}: {reason}. Booked {format_usd(billed)} of cloud time as billed "
            f"by {job.vendor_id}; budget remaining {format_usd(remaining)}{kept}",
            vendor_id=job.vendor_id,
        )
        if failed_run is not None:
            repo.add_observation(s, job.run_id, OBS.error, f"Run failed: {failed_run}")
    return TickResult(
        {
            JobStatus.completed: "Job completed",
            JobStatus.cancelled: "Run cancelled" if outcome == "cancelled" else "Job stopped",
        }.get(status, "Job failed")
    )
