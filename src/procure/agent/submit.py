"""Starting a job: quote, guard, the intent (job `submitted`, payment `pending`) written before any
money moves, then pay and submit in one x402 request, and record what came of it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from procure.agent import slices
from procure.agent.context import PlanContext, deadline_passed
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.agent.guard import check_quote, check_quote_hours, over_listed
from procure.agent.ledger import spend_cap_blocks
from procure.agent.outcomes import (
    authorization_expired,
    booked,
    fail_job,
    new_payment,
    paid_values,
    payer_for,
    payment_limits,
    penalize_vendor,
    retry_time,
    seller_settling,
    settlement_of,
    valid_until,
    vendor_trouble,
)
from procure.crashpoints import crash_point
from procure.models import (
    ACTIVE_JOB_STATUSES,
    Action,
    Job,
    JobStatus,
    Payment,
    PaymentStatus,
    RunState,
    RunStatus,
    Vendor,
    format_usd,
    utcnow,
)
from procure.payments.payer import (
    check_requirements,
    registration_gap,
)
from procure.payments.settlements import SettlementLookupError
from procure.store import repo
from procure.vendors.client import PaymentInDoubt, PaymentRefused, VendorError
from procure.vendors.protocol import VendorJob


async def start_job(
    deps: AgentDeps, ctx: PlanContext, action: Action, vendor: Vendor
) -> TickResult:
    run = ctx.state.run
    hours, slice_hours = slices.job_shape(ctx.remaining_hours, action.hours, action.slice_hours)
    # An unproven vendor is first paid for a short slice: a cancel, or its death, moments
    # after the start then costs that much; once half of it has run, the planner's shape
    # follows (its slices, or the rest at once).
    probe = None
    if not slices.proven(vendor, ctx.state.jobs):
        probe = slices.first_slice(hours, slice_hours, deps.first_slice_fraction)
    resume = ctx.resume_from  # the furthest checkpoint of the run, on whichever vendor
    spec = run.job_spec.model_copy(update={"hours": probe or slice_hours or hours})
    try:
        quote = await deps.vendors.quote(vendor, spec)
    except VendorError as exc:  # no answer, or no capacity: try elsewhere for a while
        vendor_trouble(deps, run.id, vendor, f"{vendor.vendor_id} {exc}", penalize=False, cool=True)
        return TickResult("Vendor error", action)
    asked = spec.hours
    rejection = check_quote(ctx, action, quote) or check_quote_hours(
        quote,
        asked,
        hours,
        sliced=slice_hours is not None or probe is not None,
        fee=ctx.payment_overhead,
    )
    if rejection is not None:
        vendor_trouble(
            deps, run.id, vendor, f"Quote rejected: {rejection}", penalize=False, cool=True
        )
        return TickResult("Quote rejected", action)
    now = utcnow()
    normal = "at once" if slice_hours is None else f"in slices of {slice_hours:g}h"
    params = run.job_spec.model_copy(update={"hours": hours}).model_dump(by_alias=True)
    params["totalHours"] = run.job_spec.hours
    if probe is not None and quote.hours >= (slice_hours or hours) - slices.EPS:
        probe = None  # the vendor sells at least a normal first payment: no short slice
    if probe is not None:
        params["firstSliceHours"] = quote.hours  # what was bought (a vendor may sell more)
        slice_hours = slice_hours or hours  # renewals: the planner's slice, or all the rest
    if resume is not None:
        params["resumeFrom"] = resume.checkpoint_url
    job = Job(
        _id=repo.new_id(),
        run_id=run.id,
        vendor_id=vendor.vendor_id,
        status=JobStatus.submitted,
        expected_cost=quote.amount if slice_hours is None else round(quote.price_per_hour * hours),
        job_params=params,
        idempotency_key="",
        quote_id=quote.quote_id,
        start_progress=resume.checkpoint_progress if resume else 0.0,
        checkpoint_url=resume.checkpoint_url if resume else None,
        checkpoint_progress=resume.checkpoint_progress if resume else 0.0,
        slice_hours=slice_hours,
        created_at=now,
        updated_at=now,
    )
    job.idempotency_key = f"job-{job.id}"
    payment = new_payment(run.id, job.id, vendor, quote.amount, quote.hours)
    with deps.store.session() as s:  # phase one: the intent, before any money moves
        # Write-lock the run first (a row lock on PostgreSQL, the write lock on SQLite), then
        # check against what is committed now, not what this tick read: whoever else ticked
        # this run meanwhile (a lost lease), the budget and one-job-at-a-time still hold.
        repo.update_run(s, run.id)
        conflict = _intent_conflict(repo.load_state(s, run.id, observations=False), quote.amount)
        capped = conflict is None and spend_cap_blocks(deps, s, run.id, quote.amount, "a job")
        if capped:
            return TickResult("Waiting for the global spend cap", action)
        if conflict is not None:
            repo.add_observation(s, run.id, OBS.error, f"Not starting a job: {conflict}")
            return TickResult("State changed", action)
        repo.insert_job(s, job)
        repo.insert_payment(s, payment)
        repo.add_observation(
            s,
            run.id,
            OBS.agent_reasoning,
            f"Budget remaining: {format_usd(run.budget_remaining)}\n"
            f"Quote: {format_usd(quote.amount)} USD for {quote.hours:g}h {quote.gpu_type}"
            + (
                f" (asked for {asked:g}h: {vendor.vendor_id} sells at least {quote.hours:g}h)"
                if quote.hours > asked + slices.EPS
                else ""
            )
            + (
                f" at {format_usd(quote.price_per_hour)}/h, over the "
                f"{format_usd(vendor.base_price_per_hour)}/h it is registered at: still the "
                "cost-aware planner's choice at that price"
                if over_listed(vendor, quote)
                else ""
            )
            + (
                f" (a short first slice of the {hours:g}h job: {vendor.vendor_id} has not yet "
                "completed a job for procure; once half of it has run, the rest is bought "
                f"{normal}. A cancel does not refund a paid slice)"
                if probe is not None
                else f" (first slice of {hours:g}h, paid as it runs)"
                if slice_hours
                else ""
            )
            + (
                f"\nResuming from the checkpoint at {resume.checkpoint_progress:.0%} "
                f"({resume.checkpoint_url}): {hours:g}h of {run.job_spec.hours:g}h left"
                if resume
                else ""
            )
            + f"\nProceeding with payment via x402 to vendor {vendor.vendor_id}",
            vendor_id=vendor.vendor_id,
        )
    crash_point("intent")
    return await submit(deps, job, payment, vendor, first_attempt=True)


def _intent_conflict(state: RunState | None, amount: int) -> str | None:
    """Why a new job and payment of `amount` must not be written now, or None."""
    if state is None or state.run.status != RunStatus.running:
        return "the run is no longer running"
    if state.run.cancel_requested_at is not None:  # asked while this tick quoted: no new money
        return "the run is being cancelled"
    if deadline_passed(state.run):  # it passed while this tick quoted: not one cent more
        return "the run's deadline passed"
    if any(j.status in ACTIVE_JOB_STATUSES for j in state.jobs):
        return "the run already has an active job"
    committed = sum(
        p.amount
        for p in state.payments
        if p.status in (PaymentStatus.completed, PaymentStatus.pending)
    )
    if committed + amount > state.run.budget_total:
        return (
            f"{format_usd(amount)} more would exceed the budget of "
            f"{format_usd(state.run.budget_total)} ({format_usd(committed)} committed)"
        )
    return None


async def submit(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, *, first_attempt: bool
) -> TickResult:
    """Pay and submit. `first_attempt`: no earlier attempt (before a crash, or one that got no
    answer) can have sent a signature for this payment."""
    if first_attempt:
        balance = await _balance_short(deps, payment)
        if balance is not None:
            return _insufficient_balance(deps, job, payment, vendor, balance)
    limits = payment_limits(payment, vendor)
    payer = payer_for(deps, payment, limits)
    try:
        submitted = await deps.vendors.submit(
            vendor,
            job.quote_id or "",
            idempotency_key=job.idempotency_key,
            job_params=job.job_params,
            payer=payer,
            checkpoint_url=job.job_params.get("resumeFrom"),
        )
    except PaymentRefused as exc:
        ours = [] if exc.payment_sent else [check_requirements(o, limits) for o in exc.offered]
        reason = next((r for r in ours if r), str(exc))
        signed = exc.payment_sent or not first_attempt
        # A registry record that cannot be paid is the operator's mistake, not the vendor's.
        blame = registration_gap(limits) is None
        return await payment_refused(deps, job, payment, vendor, reason, signed=signed, blame=blame)
    except VendorError as exc:
        if isinstance(exc, PaymentInDoubt) and (exc.payment_sent or not first_attempt):
            # It holds our signature and is settling it: wait as it asks, with the same key.
            return seller_settling(deps, job, payment, vendor, exc, "the job")
        if not exc.retryable:  # turned down for good: settle the payment's fate, then move on
            signed = exc.payment_sent or not first_attempt
            reason = f"{vendor.vendor_id} {exc}"
            return await payment_refused(deps, job, payment, vendor, reason, signed=signed)
        # The payment may or may not have settled: keep the intent, reconcile next tick (not
        # before a busy vendor's Retry-After).
        with deps.store.session() as s:
            if isinstance(exc, PaymentInDoubt):
                later = retry_time(deps, payment, exc.retry_after_s)
                repo.update_payment(s, payment.id, ask_again_at=later)
            repo.add_observation(
                s,
                job.run_id,
                OBS.error,
                f"{vendor.vendor_id} submit-job {exc}; will reconcile on the next tick",
                vendor_id=vendor.vendor_id,
            )
        return TickResult("Vendor error")
    crash_point("paid")
    # An idempotent replay answers without a settlement: the ledger says what moved.
    tx, amount = await settlement_of(deps, payment, submitted.tx_hash, submitted.settled_amount)
    started = record_started(
        deps, job, payment, vendor, submitted.job, tx, amount, reconciled=not first_attempt
    )
    crash_point("recorded")
    return TickResult("Job started" if started else "Job failed")


async def _balance_short(deps: AgentDeps, payment: Payment) -> int | None:
    """The wallet's balance when it cannot cover `payment`; None when it can (or is unknown:
    then the facilitator judges)."""
    try:
        balance = await deps.ledger.balance(deps.account.address)
    except SettlementLookupError:
        return None
    return balance if balance < payment.amount else None


def _insufficient_balance(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, balance: int
) -> TickResult:
    """Nothing was signed: the payment fails, and so does the run, with a reason to act on."""
    reason = (
        f"insufficient balance: wallet {deps.account.address} holds {format_usd(balance)}, "
        f"the payment to {vendor.vendor_id} needs {format_usd(payment.amount)}"
    )
    with deps.store.session() as s:
        repo.update_payment(s, payment.id, status=PaymentStatus.failed, error_message=reason)
        repo.update_job(
            s, job.id, status=JobStatus.failed, error_message=reason, completed_at=utcnow()
        )
        # Not the vendor's fault: no penalty, and not counted as the vendor's error.
        repo.add_observation(s, job.run_id, OBS.error, f"Payment not made: {reason}")
        repo.update_run(
            s,
            job.run_id,
            status=RunStatus.failed,
            status_reason=f"{reason[0].upper()}{reason[1:]}. Fund the wallet "
            "(procure wallet --fund AMOUNT) and start a new run.",
        )
    return TickResult("Insufficient balance")


async def payment_refused(
    deps: AgentDeps,
    job: Job,
    payment: Payment,
    vendor: Vendor,
    reason: str,
    *,
    signed: bool,
    blame: bool = True,
) -> TickResult:
    """A payment was refused, by our guardrails or by the vendor. If a signed authorisation
    may exist (`signed`), it may still settle, now (an earlier attempt) or later (whoever holds
    it): only the ledger and its expiry can tell when the payment has truly failed. `blame`:
    count it as the vendor's failure (False: the registry's record of it cannot be paid; it is
    only cooled down, so the run moves on rather than failing a job on it every tick)."""
    if signed:
        try:
            settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
        except SettlementLookupError as exc:
            settled = None
            reason = f"{reason} (and the ledger cannot be asked: {exc})"
        if settled is not None and settled.used:
            crash_point("refused")
            with deps.store.session() as s:
                repo.update_payment(
                    s, payment.id, **paid_values(payment, settled.transaction, settled.amount)
                )
                repo.refresh_budget(s, job.run_id)
            return await confirm_started(deps, job, vendor, settled.transaction)
        if settled is None or not authorization_expired(deps, payment):
            crash_point("refused")
            with deps.store.session() as s:
                repo.update_payment(s, payment.id, error_message=f"refused: {reason}")
                _refused_by(deps, s, vendor, blame)
                repo.add_observation(
                    s,
                    job.run_id,
                    OBS.error,
                    f"Payment to {vendor.vendor_id} refused: {reason}. Its signed authorisation "
                    f"stays valid until {valid_until(deps, payment)}, so the payment stays pending "
                    "(counted against the budget) until it expires unused or settles",
                    vendor_id=vendor.vendor_id,
                )
            return TickResult("Payment in doubt")
    crash_point("refused")
    with deps.store.session() as s:
        repo.update_payment(s, payment.id, status=PaymentStatus.failed, error_message=reason)
        repo.update_job(
            s,
            job.id,
            status=JobStatus.failed,
            error_message=f"payment refused: {reason}",
            completed_at=utcnow(),
        )
        _refused_by(deps, s, vendor, blame)
        repo.add_observation(
            s,
            job.run_id,
            OBS.error,
            f"Payment to {vendor.vendor_id} refused: {reason}",
            vendor_id=vendor.vendor_id,
        )
    return TickResult("Payment refused")


def _refused_by(deps: AgentDeps, s: Session, vendor: Vendor, blame: bool) -> None:
    """Penalise the vendor for a refused payment, or (not its fault) only cool it down."""
    if blame:
        penalize_vendor(deps, s, vendor)
    else:
        repo.cool_down(s, vendor.vendor_id, utcnow() + timedelta(seconds=deps.cooldown_s))


def held_by_another_job(s: Session, job: Job, vendor_job_id: str) -> bool:
    """Whether another live job of ours (any run) runs as `vendor_job_id` at this vendor: a
    vendor answering a submission with it is mixing jobs up, and adopting it would have this
    job poll, renew, cancel and report another run's job. (An ended job's id is not held: a
    vendor may reuse its ids.)"""
    return repo.vendor_job_held(s, job.vendor_id, vendor_job_id, but=job.id)


def record_started(
    deps: AgentDeps,
    job: Job,
    payment: Payment,
    vendor: Vendor,
    vjob: VendorJob,
    tx: str | None,
    settled_amount: int | None = None,
    *,
    reconciled: bool = False,
) -> bool:
    """Book the payment and the started job; False (the payment booked, the job failed) when
    the vendor answered with another job of ours."""
    paid = paid_values(payment, tx, settled_amount)
    amount = booked(payment, paid)
    with deps.store.session() as s:  # phase two: the outcome
        repo.update_payment(s, payment.id, **paid)
        remaining = repo.refresh_budget(s, job.run_id)
        if held_by_another_job(s, job, vjob.job_id):
            _another_job(deps, s, job, vendor, vjob, amount, remaining)
            return False
        repo.update_job(
            s, job.id, status=JobStatus.running, vendor_job_id=vjob.job_id, progress=vjob.progress
        )
        repo.add_observation(
            s,
            job.run_id,
            OBS.payment_event,
            f"Paid {format_usd(amount)} to {vendor.vendor_id} via x402 "
            f"(tx {tx or 'unknown'}); budget remaining {format_usd(remaining)}",
            vendor_id=vendor.vendor_id,
        )
        repo.add_observation(
            s,
            job.run_id,
            OBS.job_event,
            f"Job {vjob.job_id} started at {vendor.vendor_id}"
            + (" (reconciled after an interrupted submission)" if reconciled else ""),
            vendor_id=vendor.vendor_id,
        )
    return True


def _another_job(
    deps: AgentDeps,
    s: Session,
    job: Job,
    vendor: Vendor,
    vjob: VendorJob,
    amount: int,
    remaining: int,
) -> None:
    """The vendor was paid (booked) but answered with another job of ours: not adopted."""
    reason = f"paid, but {vendor.vendor_id} answered with job {vjob.job_id}, another job of ours"
    repo.update_job(s, job.id, status=JobStatus.failed, error_message=reason, completed_at=utcnow())
    penalize_vendor(deps, s, vendor)
    repo.add_observation(
        s,
        job.run_id,
        OBS.error,
        f"Paid {format_usd(amount)} to {vendor.vendor_id} via x402; budget remaining "
        f"{format_usd(remaining)}. Job failed: {reason}",
        vendor_id=vendor.vendor_id,
    )


async def confirm_started(deps: AgentDeps, job: Job, vendor: Vendor, tx: str | None) -> TickResult:
    try:
        vjob = await deps.vendors.status(
            vendor, idempotency_key=job.idempotency_key, quote_id=job.quote_id
        )
    except VendorError as exc:
        vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Payment settled; job state unknown")
    crash_point("reconciled")
    if vjob is None:
        return fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
    with deps.store.session() as s:
        taken = held_by_another_job(s, job, vjob.job_id)
    if taken:
        why = f"vendor was paid but answered with job {vjob.job_id}, another job of ours"
        return fail_job(deps, job, vendor, why)
    with deps.store.session() as s:
        repo.update_job(
            s, job.id, status=JobStatus.running, vendor_job_id=vjob.job_id, progress=vjob.progress
        )
        repo.add_observation(
            s,
            job.run_id,
            OBS.job_event,
            f"Job {vjob.job_id} started at {vendor.vendor_id} (reconciled; tx {tx or 'unknown'})",
            vendor_id=vendor.vendor_id,
        )
    return TickResult("Job started (reconciled)")
