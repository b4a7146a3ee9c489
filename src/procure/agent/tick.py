"""The tick: one stateless step of a run's state machine. It loads the run's whole state from
the store, decides, acts, and writes back; it holds nothing between calls.

Side effects are two-phase: the intent (job `submitted`, payment `pending`, with idempotency key
and nonce) is written before calling out, the outcome after. A tick that finds an intent left by
a crash reconciles it with the vendor and the facilitator before doing anything new.

Exactly once, whatever the crash: every attempt at a payment signs the same authorisation (nonce
from the payment's id, `validBefore` from its creation time), so the chain settles it at most
once; every attempt at a job sends the same idempotency key, so the vendor starts it at most
once. A payment is marked `failed` only when no money can move for it any more: nothing was
ever signed, or the ledger shows its nonce unused after its authorisation expired. Until then a
refused payment whose signature left the agent stays `pending` (in doubt, counted against the
budget) and the run waits for it. Crash points (`procure.crashpoints`) mark the gaps between
an outcome and its record, for the crash tests.

Losing less when a vendor fails: each poll keeps the job's latest checkpoint, and a new job (on
any vendor) resumes from the run's furthest one, buying only the work left. A job may be paid in
slices (`Action.slice_hours`): the tick buys the next slice when little of the paid time is left
(`agent.slices`), each slice its own payment with its own nonce and idempotency key, under the
same guardrails and budget check; at that point the planner may prefer to let the job stop at
its paid checkpoint and move on (`planner.reconsider`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from eth_account.signers.local import LocalAccount
from sqlalchemy.orm import Session
from x402 import x402Client

from procure.agent import slices
from procure.agent.context import DEFAULT_PAYMENT_OVERHEAD, PlanContext
from procure.agent.decide import decide
from procure.agent.guard import check_quote, check_renewal
from procure.agent.planner import Planner, Reconsider, heuristic_planner, reconsider
from procure.crashpoints import crash_point
from procure.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_RUN_STATUSES,
    Action,
    Job,
    JobSpec,
    JobStatus,
    ObservationType,
    Payment,
    PaymentStatus,
    Quote,
    RunState,
    RunStatus,
    Vendor,
    format_usd,
    utcnow,
)
from procure.payments.payer import (
    PaymentLimits,
    authorization_deadline,
    build_payer,
    check_requirements,
    payment_nonce,
)
from procure.payments.settlements import FacilitatorLedger, SettlementLookupError
from procure.store import Store, repo
from procure.vendors.client import PaymentRefused, VendorClient, VendorError
from procure.vendors.protocol import VendorJob

OBS = ObservationType
EPS = 1e-9


class RunNotFound(LookupError):
    pass


@dataclass
class AgentDeps:
    """What a tick needs from the outside world."""

    store: Store
    vendors: VendorClient
    account: LocalAccount
    ledger: FacilitatorLedger
    planner: Planner = heuristic_planner
    cooldown_s: float = 300.0
    auth_window_s: float = 300.0
    """How long a payment's signed authorisation stays valid after the payment is created."""
    auth_margin_s: float = 30.0
    """Clock skew allowed past `validBefore` before an unused authorisation counts as dead."""
    payment_overhead: int = DEFAULT_PAYMENT_OVERHEAD
    """What the planner counts each extra payment as costing, in micro-USD."""
    reconsider: Reconsider | None = reconsider
    """Asked at each renewal of a sliced job whether to stop at the paid checkpoint and move;
    None: always renew."""


@dataclass(frozen=True)
class TickResult:
    message: str
    action: Action | None = None

    def to_json(self) -> dict[str, object]:
        return {"message": self.message, "action": self.action.to_json() if self.action else None}


async def tick(deps: AgentDeps, run_id: str) -> TickResult:
    with deps.store.session() as s:
        state = repo.load_tick_state(s, run_id)
        if state is None:
            raise RunNotFound(run_id)
        active = next((j for j in state.jobs if j.status in ACTIVE_JOB_STATUSES), None)
        polling = (
            state.run.status not in TERMINAL_RUN_STATUSES
            and active is not None
            and active.status == JobStatus.running
        )
        if polling:  # the hot path: only the job's vendor; the rest is loaded if planning
            assert active is not None
            job_vendor = repo.get_vendor_row(s, active.vendor_id)
            vendors = [job_vendor] if job_vendor is not None else []
            errors: dict[str, int] | None = None
        else:
            vendors = repo.list_vendors(s)
            errors = repo.vendor_error_counts(s, run_id)
    if state.run.status in TERMINAL_RUN_STATUSES:
        return TickResult(f"Run already {state.run.status}")
    ctx = PlanContext(
        state=state,
        vendors=vendors,
        errors_by_vendor=errors or {},
        payment_overhead=deps.payment_overhead,
    )
    if active is not None:
        vendor = ctx.vendor(active.vendor_id)
        if vendor is None:
            return _fail_job(deps, active, None, f"vendor {active.vendor_id} left the registry")
        if active.status == JobStatus.submitted:
            return await _reconcile(deps, ctx, active, vendor)
        return await _poll(deps, ctx, active, vendor, partial=errors is None)
    if await _settle_stray_slices(deps, ctx):
        # Nothing new while money is in doubt: the run must not end with it unsettled.
        return TickResult("Payment in doubt")
    finished = next((j for j in state.jobs if j.status == JobStatus.completed), None)
    if finished is not None:  # its job completed while a slice payment was in doubt
        with deps.store.session() as s:
            repo.update_run(s, run_id, status=RunStatus.completed, progress=1.0)
        return TickResult("Job completed")
    return await _plan_and_act(deps, ctx)


# --- planning ------------------------------------------------------------------------------


async def _plan_and_act(deps: AgentDeps, ctx: PlanContext) -> TickResult:
    run_id = ctx.state.run.id
    decision = await decide(deps.planner, ctx)  # the planner, the guard, the fallback
    if ctx.notes:  # what the planner asked to keep, e.g. the LLM's raw answer and rejections
        with deps.store.session() as s:
            for note_type, content in ctx.notes:
                repo.add_observation(s, run_id, note_type, content)
    if decision.rejected is not None:
        with deps.store.session() as s:
            repo.add_observation(
                s,
                run_id,
                OBS.error,
                f"Guard rejected {decision.rejected.action} on {decision.rejected.vendor_id}: "
                f"{decision.rejection}; the deterministic planner decides instead",
            )
    action = decision.action
    with deps.store.session() as s:
        repo.add_observation(s, run_id, OBS.agent_reasoning, action.reason)
        if action.action == "abort":
            repo.update_run(s, run_id, status=RunStatus.aborted, status_reason=action.reason)
            return TickResult("Run aborted", action)
    if action.action == "wait":
        return TickResult("Waiting", action)
    vendor = ctx.vendor(action.vendor_id)
    assert vendor is not None  # the guard checked it
    result = await _start_job(deps, ctx, action, vendor)
    return TickResult(result.message, action)


async def _start_job(
    deps: AgentDeps, ctx: PlanContext, action: Action, vendor: Vendor
) -> TickResult:
    run = ctx.state.run
    hours, slice_hours = slices.job_shape(ctx.remaining_hours, action.hours, action.slice_hours)
    resume = ctx.resume_from  # the furthest checkpoint of the run, on whichever vendor
    spec = run.job_spec.model_copy(update={"hours": slice_hours or hours})
    try:
        quote = await deps.vendors.quote(vendor, spec)
    except VendorError as exc:  # no answer, or no capacity: try elsewhere for a while
        _vendor_trouble(
            deps, run.id, vendor, f"{vendor.vendor_id} {exc}", penalize=False, cool=True
        )
        return TickResult("Vendor error", action)
    rejection = check_quote(ctx, action, quote)
    if rejection is not None:
        _vendor_trouble(deps, run.id, vendor, f"Quote rejected: {rejection}", penalize=False)
        return TickResult("Quote rejected", action)
    now = utcnow()
    params = run.job_spec.model_copy(update={"hours": hours}).model_dump(by_alias=True)
    params["totalHours"] = run.job_spec.hours
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
    payment = _new_payment(run.id, job.id, vendor, quote.amount, quote.hours)
    with deps.store.session() as s:  # phase one: the intent, before any money moves
        # Write-lock the run first (a row lock on PostgreSQL, the write lock on SQLite), then
        # check against what is committed now, not what this tick read: whoever else ticked
        # this run meanwhile (a lost lease), the budget and one-job-at-a-time still hold.
        repo.update_run(s, run.id)
        conflict = _intent_conflict(repo.load_state(s, run.id, observations=False), quote.amount)
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
            + (f" (first slice of {hours:g}h, paid as it runs)" if slice_hours else "")
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
    return await _submit(deps, job, payment, vendor, first_attempt=True)


def _intent_conflict(state: RunState | None, amount: int) -> str | None:
    """Why a new job and payment of `amount` must not be written now, or None."""
    if state is None or state.run.status != RunStatus.running:
        return "the run is no longer running"
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


def _payer(deps: AgentDeps, payment: Payment, limits: PaymentLimits) -> x402Client:
    """The x402 client for one payment: its own nonce and expiry, behind `limits`."""
    return build_payer(
        deps.account, payment.nonce, limits, valid_before=_valid_before(deps, payment)
    )


def _new_payment(run_id: str, job_id: str, vendor: Vendor, amount: int, hours: float) -> Payment:
    """A pending payment: its nonce is derived from its own id, so every retry reuses it."""
    now = utcnow()
    payment_id = repo.new_id()
    return Payment(
        _id=payment_id,
        run_id=run_id,
        job_id=job_id,
        vendor_id=vendor.vendor_id,
        amount=amount,
        status=PaymentStatus.pending,
        nonce=payment_nonce(payment_id),
        pay_to=vendor.pay_to,
        hours=hours,
        created_at=now,
        updated_at=now,
    )


# --- submitting and paying -----------------------------------------------------------------


def _limits(payment: Payment, vendor: Vendor) -> PaymentLimits:
    return PaymentLimits(
        max_amount=payment.amount, pay_to=vendor.pay_to, asset=vendor.asset, network=vendor.network
    )


def _valid_before(deps: AgentDeps, payment: Payment) -> int:
    return authorization_deadline(payment.created_at, deps.auth_window_s)


def _expired(deps: AgentDeps, payment: Payment) -> bool:
    """Whether the payment's authorisation can no longer be settled by anyone."""
    return time.time() > _valid_before(deps, payment) + deps.auth_margin_s


def _until(deps: AgentDeps, payment: Payment) -> str:
    return datetime.fromtimestamp(_valid_before(deps, payment), UTC).strftime("%H:%M:%S UTC")


async def _submit(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, *, first_attempt: bool
) -> TickResult:
    """Pay and submit. `first_attempt`: no earlier attempt (before a crash, or one that got no
    answer) can have sent a signature for this payment."""
    if first_attempt:
        balance = await _balance_short(deps, payment)
        if balance is not None:
            return _insufficient_balance(deps, job, payment, vendor, balance)
    limits = _limits(payment, vendor)
    payer = _payer(deps, payment, limits)
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
        return await _payment_refused(deps, job, payment, vendor, reason, signed=signed)
    except VendorError as exc:
        if not exc.retryable:  # turned down for good: settle the payment's fate, then move on
            signed = exc.payment_sent or not first_attempt
            reason = f"{vendor.vendor_id} {exc}"
            return await _payment_refused(deps, job, payment, vendor, reason, signed=signed)
        # The payment may or may not have settled: keep the intent, reconcile next tick.
        with deps.store.session() as s:
            repo.add_observation(
                s,
                job.run_id,
                OBS.error,
                f"{vendor.vendor_id} submit-job {exc}; will reconcile on the next tick",
                vendor_id=vendor.vendor_id,
            )
        return TickResult("Vendor error")
    crash_point("paid")
    tx = submitted.tx_hash
    if tx is None:  # an idempotent replay answers without a new settlement: ask the ledger
        tx = await _settled_tx(deps, payment)
    _record_started(
        deps,
        job,
        payment,
        vendor,
        submitted.job,
        tx,
        submitted.settled_amount,
        reconciled=not first_attempt,
    )
    crash_point("recorded")
    return TickResult("Job started")


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


async def _payment_refused(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, reason: str, *, signed: bool
) -> TickResult:
    """A payment was refused, by our guardrails or by the vendor. If a signed authorisation
    may exist (`signed`), it may still settle, now (an earlier attempt) or later (whoever holds
    it): only the ledger and its expiry can tell when the payment has truly failed."""
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
                    s, payment.id, **_paid(payment, settled.transaction, settled.amount)
                )
                repo.refresh_budget(s, job.run_id)
            return await _reconcile_after_paid(deps, job, vendor, settled.transaction)
        if settled is None or not _expired(deps, payment):
            crash_point("refused")
            with deps.store.session() as s:
                repo.update_payment(s, payment.id, error_message=f"refused: {reason}")
                _penalize(deps, s, vendor)
                repo.add_observation(
                    s,
                    job.run_id,
                    OBS.error,
                    f"Payment to {vendor.vendor_id} refused: {reason}. Its signed authorisation "
                    f"stays valid until {_until(deps, payment)}, so the payment stays pending "
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
        _penalize(deps, s, vendor)
        repo.add_observation(
            s,
            job.run_id,
            OBS.error,
            f"Payment to {vendor.vendor_id} refused: {reason}",
            vendor_id=vendor.vendor_id,
        )
    return TickResult("Payment refused")


async def _settled_tx(deps: AgentDeps, payment: Payment) -> str | None:
    try:
        return (await deps.ledger.lookup(deps.account.address, payment.nonce)).transaction
    except SettlementLookupError:
        return None


def _paid(payment: Payment, tx: str | None, amount: int | None) -> dict[str, object]:
    """A payment's completion: its transaction and, if the vendor took less than quoted, what
    really moved (so the store's sums match the chain's)."""
    paid: dict[str, object] = {"status": PaymentStatus.completed, "x402_tx_id": tx}
    if amount is not None and 0 < amount < payment.amount:
        paid["amount"] = amount
    return paid


def _record_started(
    deps: AgentDeps,
    job: Job,
    payment: Payment,
    vendor: Vendor,
    vjob: VendorJob,
    tx: str | None,
    settled_amount: int | None = None,
    *,
    reconciled: bool = False,
) -> None:
    paid = _paid(payment, tx, settled_amount)
    amount = int(paid.get("amount", payment.amount))  # type: ignore[call-overload]
    with deps.store.session() as s:  # phase two: the outcome
        repo.update_payment(s, payment.id, **paid)
        remaining = repo.refresh_budget(s, job.run_id)
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


# --- reconciling an intent left by a crash or a lost answer --------------------------------


async def _reconcile(deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor) -> TickResult:
    payment = next(
        (p for p in ctx.state.payments if p.job_id == job.id and p.status != PaymentStatus.failed),
        None,
    )
    if payment is None:  # no live payment: the job can never have been paid for
        return _fail_job(deps, job, vendor, "job has no payment", penalize=False)
    if payment.status == PaymentStatus.completed:
        return await _reconcile_after_paid(deps, job, vendor, payment.x402_tx_id)
    # The ledger first: it alone says whether money moved, and it answers when the vendor is down.
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError as exc:
        with deps.store.session() as s:
            repo.add_observation(s, job.run_id, OBS.error, f"Cannot reconcile yet: {exc}")
        return TickResult("Payment outcome unknown")
    if settled.used:
        try:
            vjob = await deps.vendors.status(vendor, idempotency_key=job.idempotency_key)
        except VendorError as exc:
            vjob, trouble = None, exc
        else:
            trouble = None
        crash_point("reconciled")
        if vjob is not None:
            _record_started(
                deps,
                job,
                payment,
                vendor,
                vjob,
                settled.transaction,
                settled.amount,
                reconciled=True,
            )
            return TickResult("Job started (reconciled)")
        with deps.store.session() as s:
            repo.update_payment(
                s, payment.id, **_paid(payment, settled.transaction, settled.amount)
            )
            repo.refresh_budget(s, job.run_id)
        if trouble is not None:  # paid; the job's fate waits for the vendor to answer
            _vendor_trouble(
                deps, job.run_id, vendor, f"{vendor.vendor_id} {trouble}", penalize=False
            )
            return TickResult("Payment settled; job state unknown")
        return _fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
    if _expired(deps, payment):
        # Unused and expired: nothing can ever settle it, and unpaid, no vendor runs the job.
        crash_point("reconciled")
        refused = f" ({payment.error_message})" if payment.error_message else ""
        reason = (
            f"payment authorisation expired unused at {_until(deps, payment)}{refused}; "
            "no money moved"
        )
        with deps.store.session() as s:
            repo.update_payment(s, payment.id, status=PaymentStatus.failed, error_message=reason)
        return _fail_job(deps, job, vendor, reason, penalize=False)
    try:
        vjob = await deps.vendors.status(vendor, idempotency_key=job.idempotency_key)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    if vjob is not None:  # the vendor took it (it records only paid jobs): it settled just now
        tx = await _settled_tx(deps, payment)
        crash_point("reconciled")
        _record_started(deps, job, payment, vendor, vjob, tx, reconciled=True)
        return TickResult("Job started (reconciled)")
    if payment.error_message:  # refused after signing: wait until it settles or expires
        return TickResult(f"Payment in doubt until {_until(deps, payment)}")
    # Neither paid nor started: submit again, with the same key and the same authorisation.
    return await _submit(deps, job, payment, vendor, first_attempt=False)


async def _reconcile_after_paid(
    deps: AgentDeps, job: Job, vendor: Vendor, tx: str | None
) -> TickResult:
    try:
        vjob = await deps.vendors.status(vendor, idempotency_key=job.idempotency_key)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Payment settled; job state unknown")
    crash_point("reconciled")
    if vjob is None:
        return _fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
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


# --- watching a running job ----------------------------------------------------------------


def _full_context(deps: AgentDeps, ctx: PlanContext) -> PlanContext:
    """`ctx` with every vendor and this run's error counts, for a poll that must plan."""
    with deps.store.session() as s:
        vendors = repo.list_vendors(s)
        errors = repo.vendor_error_counts(s, ctx.state.run.id)
    return replace(ctx, vendors=vendors, errors_by_vendor=errors)


async def _poll(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, *, partial: bool = False
) -> TickResult:
    """Poll a running job. `partial`: `ctx` holds only the job's vendor and no error counts
    (enough to poll); the rest is loaded before anything that plans."""
    pending = next(
        (p for p in ctx.state.payments if p.job_id == job.id and p.status == PaymentStatus.pending),
        None,
    )
    if pending is not None and not pending.error_message:  # a slice bought before a crash
        return await _retry_slice(deps, job, pending, vendor)
    if pending is not None and await _settle_in_doubt(deps, job, pending, vendor) is None:
        pending = None  # settled or expired: from now on it is just history
    try:
        vjob = await deps.vendors.status(vendor, vendor_job_id=job.vendor_job_id)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    crash_point("polled")
    if vjob is None:
        return _fail_job(deps, job, vendor, f"{vendor.vendor_id} has no record of the job")
    new_lines = vjob.logs[job.log_cursor :]
    now = utcnow()
    saved_url, saved = job.checkpoint_url, job.checkpoint_progress
    if vjob.checkpoint_url and (vjob.checkpoint_progress or 0.0) > saved + EPS:
        saved_url, saved = vjob.checkpoint_url, vjob.checkpoint_progress or 0.0
    with deps.store.session() as s:
        repo.record_poll(
            s,
            job.run_id,
            job.id,
            log_cursor=len(vjob.logs),
            progress=vjob.progress,
            checkpoint_url=saved_url,
            checkpoint_progress=saved,
        )
        for line in new_lines:
            repo.add_observation(s, job.run_id, OBS.job_log, line, vendor_id=vendor.vendor_id)
        if saved > job.checkpoint_progress + EPS:
            repo.add_observation(
                s,
                job.run_id,
                OBS.job_event,
                f"Checkpoint at {saved:.0%} saved at {vendor.vendor_id}: {saved_url}",
                vendor_id=vendor.vendor_id,
            )
        if vjob.status == "completed":
            repo.update_job(
                s,
                job.id,
                status=JobStatus.completed,
                metrics=vjob.metrics,
                artifact_url=vjob.artifact_url,
                actual_cost=_paid_for(ctx, job),
                completed_at=now,
            )
            # A slice payment still in doubt keeps the run open until its fate is known.
            done = pending is None
            repo.update_run(
                s, job.run_id, progress=1.0, **({"status": RunStatus.completed} if done else {})
            )
            repo.record_vendor_outcome(
                s, vendor.vendor_id, success=True, gpu_hours=_gpu_hours(job, 1.0)
            )
            repo.add_observation(
                s,
                job.run_id,
                OBS.job_event,
                f"Job {vjob.job_id} completed at {vendor.vendor_id}: {vjob.metrics}; "
                f"artifact {vjob.artifact_url}",
                vendor_id=vendor.vendor_id,
            )
            return TickResult("Job completed")
    job = job.model_copy(update={"checkpoint_url": saved_url, "checkpoint_progress": saved})
    if vjob.status in ("failed", "cancelled"):
        reason = vjob.error or f"job {vjob.status} by the vendor"
        return _fail_job(deps, job, vendor, reason, progress=vjob.progress, ctx=ctx)
    if vjob.status == "expired":  # its paid time ran out before another slice was bought
        return _stop_job(deps, ctx, job, vendor, vjob, "its paid time ran out")
    if pending is not None:  # a slice in doubt: buy no other until its fate is known
        return TickResult(f"Job running ({vjob.progress:.0%}); a slice payment is in doubt")
    paid = slices.paid_hours(job, ctx.state.payments)
    if slices.renewal_due(job, paid, vjob.progress):
        limit = slices.paid_until(job, paid)
        if partial:
            ctx = _full_context(deps, ctx)
        move = deps.reconsider(ctx, job, limit) if deps.reconsider else None
        if move is None:
            return await _renew(deps, ctx, job, vendor, paid)
        if vjob.progress >= limit - EPS:  # it has reached its paid checkpoint: let it go
            return _stop_job(deps, ctx, job, vendor, vjob, move)
    return TickResult(f"Job running ({vjob.progress:.0%})")


def _paid_for(ctx: PlanContext, job: Job) -> int:
    return sum(
        p.amount
        for p in ctx.state.payments
        if p.job_id == job.id and p.status == PaymentStatus.completed
    )


def _gpu_hours(job: Job, progress: float) -> float:
    """GPU-hours the job ran for, from where it started to `progress` of the run."""
    return max(0.0, progress - job.start_progress) * slices.total_hours(job)


def _stop_job(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, vjob: VendorJob, why: str
) -> TickResult:
    """End a job that is not the vendor's fault to end: paid time over, by choice or budget.
    Its checkpoint stands; the next job resumes from it."""
    with deps.store.session() as s:
        repo.update_job(
            s,
            job.id,
            status=JobStatus.cancelled,
            error_message=f"stopped at {vjob.progress:.0%}: {why}",
            actual_cost=_paid_for(ctx, job),
            completed_at=utcnow(),
        )
        repo.record_vendor_hours(s, vendor.vendor_id, _gpu_hours(job, vjob.progress))
        repo.update_run(s, job.run_id, progress=max(job.checkpoint_progress, ctx.resume_progress))
        repo.add_observation(
            s,
            job.run_id,
            OBS.job_event,
            f"Job {vjob.job_id} at {vendor.vendor_id} stopped at {vjob.progress:.0%}, "
            f"checkpoint at {job.checkpoint_progress:.0%} kept: {why}",
            vendor_id=vendor.vendor_id,
        )
    return TickResult("Job stopped at a checkpoint")


# --- paying as it runs ---------------------------------------------------------------------


def _slice_key(payment: Payment) -> str:
    return f"slice-{payment.id}"  # one idempotency key per slice, stable across retries


async def _renew(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, paid: float
) -> TickResult:
    """Buy the job's next slice: quote, guard, intent, then pay (its own nonce and key)."""
    hours = slices.next_slice_hours(job, paid)
    spec = JobSpec.model_validate(job.job_params).model_copy(update={"hours": hours})
    try:
        quote = await deps.vendors.quote(vendor, spec)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    rejection = check_renewal(ctx, job, quote)
    if rejection is not None:  # the job runs out its paid time; then the run moves on
        return TickResult(f"Slice not bought: {rejection}")
    payment = _new_payment(job.run_id, job.id, vendor, quote.amount, hours)
    with deps.store.session() as s:  # phase one: the intent
        repo.update_run(s, job.run_id)  # write-lock the run, then check what is committed
        conflict = _slice_conflict(repo.load_state(s, job.run_id, observations=False), job, quote)
        if conflict is not None:
            repo.add_observation(s, job.run_id, OBS.error, f"Not buying a slice: {conflict}")
            return TickResult("State changed")
        repo.insert_payment(s, payment)
        repo.add_observation(
            s,
            job.run_id,
            OBS.agent_reasoning,
            f"Renewing {vendor.vendor_id}: {format_usd(quote.amount)} for the next {hours:g}h "
            f"({paid:g}h of {slices.job_hours(job):g}h paid so far)",
            vendor_id=vendor.vendor_id,
        )
    crash_point("intent")
    return await _pay_slice(deps, job, payment, vendor, quote.quote_id, first_attempt=True)


def _slice_conflict(state: RunState | None, job: Job, quote: Quote) -> str | None:
    if state is None or state.run.status != RunStatus.running:
        return "the run is no longer running"
    current = next((j for j in state.jobs if j.id == job.id), None)
    if current is None or current.status != JobStatus.running:
        return "the job is no longer running"
    if any(p.job_id == job.id and p.status == PaymentStatus.pending for p in state.payments):
        return "another slice of this job is being paid"
    committed = sum(
        p.amount
        for p in state.payments
        if p.status in (PaymentStatus.completed, PaymentStatus.pending)
    )
    if committed + quote.amount > state.run.budget_total:
        return f"{format_usd(quote.amount)} more would exceed the budget"
    return None


async def _retry_slice(deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor) -> TickResult:
    """A slice whose payment was left pending (a crash, or no answer): pay it again, with the
    same nonce and the same key, so that it is bought at most once."""
    if _expired(deps, payment):
        return await _slice_refused(
            deps, job, payment, vendor, "its authorisation expired", signed=True
        )
    spec = JobSpec.model_validate(job.job_params).model_copy(update={"hours": payment.hours})
    try:
        quote = await deps.vendors.quote(vendor, spec)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    return await _pay_slice(deps, job, payment, vendor, quote.quote_id, first_attempt=False)


async def _pay_slice(
    deps: AgentDeps,
    job: Job,
    payment: Payment,
    vendor: Vendor,
    quote_id: str,
    *,
    first_attempt: bool,
) -> TickResult:
    limits = _limits(payment, vendor)
    payer = _payer(deps, payment, limits)
    try:
        renewed = await deps.vendors.renew(
            vendor,
            job.vendor_job_id or "",
            quote_id,
            idempotency_key=_slice_key(payment),
            payer=payer,
        )
    except VendorError as exc:
        signed = exc.payment_sent or not first_attempt
        if exc.retryable and not isinstance(exc, PaymentRefused):
            with deps.store.session() as s:  # it may have settled: retry with the same nonce
                repo.add_observation(
                    s,
                    job.run_id,
                    OBS.error,
                    f"{vendor.vendor_id} renew-job {exc}; will retry on the next tick",
                    vendor_id=vendor.vendor_id,
                )
            return TickResult("Vendor error")
        ours = []
        if isinstance(exc, PaymentRefused) and not exc.payment_sent:
            ours = [check_requirements(o, limits) for o in exc.offered]
        reason = next((r for r in ours if r), f"{vendor.vendor_id} {exc}")
        return await _slice_refused(deps, job, payment, vendor, reason, signed=signed)
    crash_point("paid")
    tx = renewed.tx_hash or await _settled_tx(deps, payment)
    _record_slice(deps, job, payment, vendor, tx)
    crash_point("recorded")
    return TickResult("Slice renewed")


def _record_slice(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, tx: str | None
) -> None:
    with deps.store.session() as s:
        repo.update_payment(s, payment.id, status=PaymentStatus.completed, x402_tx_id=tx)
        remaining = repo.refresh_budget(s, job.run_id)
        repo.add_observation(
            s,
            job.run_id,
            OBS.payment_event,
            f"Paid {format_usd(payment.amount)} to {vendor.vendor_id} via x402 for "
            f"{payment.hours:g}h more of job {job.vendor_job_id} (tx {tx or 'unknown'}); "
            f"budget remaining {format_usd(remaining)}",
            vendor_id=vendor.vendor_id,
        )


async def _slice_refused(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, reason: str, *, signed: bool
) -> TickResult:
    """A slice's payment was refused. As for a job's first payment: if a signed authorisation
    may exist it stays pending until the ledger shows it settled or expired unused."""
    if signed:
        outcome = await _settle_in_doubt(deps, job, payment, vendor, reason=reason)
        if outcome is not None:
            return outcome
        return TickResult("Slice payment settled or expired")
    with deps.store.session() as s:
        repo.update_payment(s, payment.id, status=PaymentStatus.failed, error_message=reason)
        repo.add_observation(
            s,
            job.run_id,
            OBS.error,
            f"Slice payment to {vendor.vendor_id} refused: {reason}",
            vendor_id=vendor.vendor_id,
        )
    return TickResult("Slice refused")


async def _settle_in_doubt(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, *, reason: str | None = None
) -> TickResult | None:
    """Ask the ledger about a slice payment that may have settled. None once its fate is
    recorded (completed or failed); else it stays pending and the answer says why."""
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError:
        settled = None
    if settled is not None and settled.used:
        _record_slice(deps, job, payment, vendor, settled.transaction)
        return None
    if settled is not None and _expired(deps, payment):
        with deps.store.session() as s:
            repo.update_payment(
                s,
                payment.id,
                status=PaymentStatus.failed,
                error_message=(payment.error_message or reason or "refused")
                + "; authorisation expired unused",
            )
        return None
    if reason is not None and reason != payment.error_message:
        with deps.store.session() as s:
            repo.update_payment(s, payment.id, error_message=f"refused: {reason}")
            repo.add_observation(
                s,
                job.run_id,
                OBS.error,
                f"Slice payment to {vendor.vendor_id} refused: {reason}. It stays pending "
                f"until its authorisation expires unused ({_until(deps, payment)}) or settles",
                vendor_id=vendor.vendor_id,
            )
    return TickResult(f"Payment in doubt until {_until(deps, payment)}")


async def _settle_stray_slices(deps: AgentDeps, ctx: PlanContext) -> bool:
    """Slice payments still in doubt on jobs that have ended: record their fate once the ledger
    knows it. True while some are still in doubt."""
    ended = {j.id: j for j in ctx.state.jobs if j.status not in ACTIVE_JOB_STATUSES}
    doubt = False
    for payment in ctx.state.payments:
        job = ended.get(payment.job_id)
        vendor = ctx.vendor(payment.vendor_id)
        if payment.status == PaymentStatus.pending and job is not None and vendor is not None:
            doubt = await _settle_in_doubt(deps, job, payment, vendor) is not None or doubt
    return doubt


# --- payments in doubt on runs that have ended -------------------------------------------


async def settle_ended_runs(deps: AgentDeps, *, limit: int = 50) -> int:
    """Record the fate of payments left pending on runs that have ended (a signed authorisation
    refused but still valid when the run finished elsewhere): completed if the ledger shows
    the nonce used, failed once it expired unused. Nobody ticks an ended run, so the worker
    calls this now and then. Returns how many were settled."""
    with deps.store.session() as s:
        payments = repo.pending_payments_of_ended_runs(s, limit=limit)
    settled_count = 0
    for payment in payments:
        try:
            settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
        except SettlementLookupError:
            continue
        if settled.used:
            values = _paid(payment, settled.transaction, settled.amount)
            note = f"settled after all (tx {settled.transaction})"
        elif _expired(deps, payment):
            values = {
                "status": PaymentStatus.failed,
                "error_message": f"{payment.error_message or 'in doubt'}; "
                "authorisation expired unused",
            }
            note = "expired unused: no money moved"
        else:
            continue
        with deps.store.session() as s:
            if repo.settle_pending_payment(s, payment.id, **values):
                remaining = repo.refresh_budget(s, payment.run_id)
                repo.add_observation(
                    s,
                    payment.run_id,
                    OBS.payment_event,
                    f"Payment of {format_usd(payment.amount)} to {payment.vendor_id}, in doubt "
                    f"when the run ended, {note}; budget remaining {format_usd(remaining)}",
                    vendor_id=payment.vendor_id,
                )
                settled_count += 1
    return settled_count


# --- failures ------------------------------------------------------------------------------


def _penalize(deps: AgentDeps, s: Session, vendor: Vendor, gpu_hours: float = 0.0) -> None:
    """Count a failure against the vendor (with the GPU-hours it ran, for its hazard) and cool
    it down: VENDOR_COOLDOWN_S before any planner may pick it again."""
    repo.record_vendor_outcome(
        s,
        vendor.vendor_id,
        success=False,
        gpu_hours=gpu_hours,
        cooldown_until=utcnow() + timedelta(seconds=deps.cooldown_s),
    )


def _fail_job(
    deps: AgentDeps,
    job: Job,
    vendor: Vendor | None,
    reason: str,
    *,
    penalize: bool = True,
    progress: float | None = None,
    ctx: PlanContext | None = None,
) -> TickResult:
    ran = _gpu_hours(job, progress if progress is not None else job.progress)
    saved = max(job.checkpoint_progress, ctx.resume_progress if ctx else 0.0)
    with deps.store.session() as s:
        repo.update_job(
            s,
            job.id,
            status=JobStatus.failed,
            error_message=reason,
            completed_at=utcnow(),
            **({"progress": progress} if progress is not None else {}),
            **({"actual_cost": _paid_for(ctx, job)} if ctx else {}),
        )
        if vendor is not None and penalize:
            _penalize(deps, s, vendor, gpu_hours=ran)
        if saved > 0:  # what the next job resumes from
            repo.update_run(s, job.run_id, progress=saved)
        where = f" at {progress:.0%}" if progress is not None else ""
        kept = f"; the checkpoint at {saved:.0%} is kept" if saved > 0 else ""
        repo.add_observation(
            s,
            job.run_id,
            OBS.error,
            f"{job.vendor_id} failed{where}: {reason}{kept}",
            vendor_id=job.vendor_id,
        )
    return TickResult("Job failed")


def _vendor_trouble(
    deps: AgentDeps,
    run_id: str,
    vendor: Vendor,
    message: str,
    *,
    penalize: bool,
    cool: bool = False,
) -> None:
    """Record trouble with a vendor. `cool`: it cannot take work now (down, no capacity), so
    planners leave it alone for VENDOR_COOLDOWN_S, without counting it as a failure."""
    with deps.store.session() as s:
        repo.add_observation(s, run_id, OBS.error, message, vendor_id=vendor.vendor_id)
        if penalize:
            _penalize(deps, s, vendor)
        elif cool:
            repo.cool_down(s, vendor.vendor_id, utcnow() + timedelta(seconds=deps.cooldown_s))
