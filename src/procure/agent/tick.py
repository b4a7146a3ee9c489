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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from eth_account.signers.local import LocalAccount
from sqlalchemy.orm import Session

from procure.agent.context import PlanContext
from procure.agent.guard import check_action, check_quote
from procure.agent.planner import DETERMINISTIC, Planner, heuristic_planner
from procure.crashpoints import crash_point
from procure.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_RUN_STATUSES,
    Action,
    Job,
    JobStatus,
    ObservationType,
    Payment,
    PaymentStatus,
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


@dataclass(frozen=True)
class TickResult:
    message: str
    action: Action | None = None

    def to_json(self) -> dict[str, object]:
        return {"message": self.message, "action": self.action.to_json() if self.action else None}


async def tick(deps: AgentDeps, run_id: str) -> TickResult:
    with deps.store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        if state is None:
            raise RunNotFound(run_id)
        vendors = repo.list_vendors(s)
        errors = repo.vendor_error_counts(s, run_id)
    if state.run.status in TERMINAL_RUN_STATUSES:
        return TickResult(f"Run already {state.run.status}")
    ctx = PlanContext(state=state, vendors=vendors, errors_by_vendor=errors)
    active = next((j for j in state.jobs if j.status in ACTIVE_JOB_STATUSES), None)
    if active is not None:
        vendor = ctx.vendor(active.vendor_id)
        if vendor is None:
            return _fail_job(deps, active, None, f"vendor {active.vendor_id} left the registry")
        if active.status == JobStatus.submitted:
            return await _reconcile(deps, ctx, active, vendor)
        return await _poll(deps, ctx, active, vendor)
    return await _plan_and_act(deps, ctx)


# --- planning ------------------------------------------------------------------------------


async def _plan_and_act(deps: AgentDeps, ctx: PlanContext) -> TickResult:
    run_id = ctx.state.run.id
    action = await deps.planner(ctx)
    if ctx.notes:  # what the planner asked to keep, e.g. the LLM's raw answer and rejections
        with deps.store.session() as s:
            for note_type, content in ctx.notes:
                repo.add_observation(s, run_id, note_type, content)
    rejection = check_action(ctx, action)
    if rejection is not None:
        fallback = await DETERMINISTIC["heuristic"](ctx)
        with deps.store.session() as s:
            repo.add_observation(
                s,
                run_id,
                OBS.error,
                f"Guard rejected {action.action} on {action.vendor_id}: "
                f"{rejection}; the deterministic planner decides instead",
            )
        action = fallback
        if check_action(ctx, action) is not None:  # cannot happen for the heuristic; be safe
            action = Action(action="wait", reason=f"No safe action: {rejection}")
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
    spec = run.job_spec.model_copy(update={"hours": action.hours or run.job_spec.hours})
    try:
        quote = await deps.vendors.quote(vendor, spec)
    except VendorError as exc:
        _vendor_trouble(deps, run.id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error", action)
    rejection = check_quote(ctx, action, quote)
    if rejection is not None:
        _vendor_trouble(deps, run.id, vendor, f"Quote rejected: {rejection}", penalize=False)
        return TickResult("Quote rejected", action)
    now = utcnow()
    job = Job(
        _id=repo.new_id(),
        run_id=run.id,
        vendor_id=vendor.vendor_id,
        status=JobStatus.submitted,
        expected_cost=quote.amount,
        job_params=spec.model_dump(by_alias=True),
        idempotency_key="",
        quote_id=quote.quote_id,
        created_at=now,
        updated_at=now,
    )
    job.idempotency_key = f"job-{job.id}"
    payment_id = repo.new_id()
    payment = Payment(
        _id=payment_id,
        run_id=run.id,
        job_id=job.id,
        vendor_id=vendor.vendor_id,
        amount=quote.amount,
        status=PaymentStatus.pending,
        nonce=payment_nonce(payment_id),
        pay_to=vendor.pay_to,
        created_at=now,
        updated_at=now,
    )
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
            f"Quote: {format_usd(quote.amount)} USD for {quote.hours:g}h {quote.gpu_type}\n"
            f"Proceeding with payment via x402 to vendor {vendor.vendor_id}",
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
    payer = build_payer(
        deps.account, payment.nonce, limits, valid_before=_valid_before(deps, payment)
    )
    try:
        submitted = await deps.vendors.submit(
            vendor,
            job.quote_id or "",
            idempotency_key=job.idempotency_key,
            job_params=job.job_params,
            payer=payer,
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
    _record_started(deps, job, payment, vendor, submitted.job, tx, submitted.settled_amount)
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
                    s, payment.id, status=PaymentStatus.completed, x402_tx_id=settled.transaction
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


def _record_started(
    deps: AgentDeps,
    job: Job,
    payment: Payment,
    vendor: Vendor,
    vjob: VendorJob,
    tx: str | None,
    settled_amount: int | None = None,
) -> None:
    paid: dict[str, object] = {"status": PaymentStatus.completed, "x402_tx_id": tx}
    if settled_amount is not None and 0 < settled_amount < payment.amount:
        paid["amount"] = settled_amount  # the vendor asked less than quoted: record what moved
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
            f"Job {vjob.job_id} started at {vendor.vendor_id}",
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
            _record_started(deps, job, payment, vendor, vjob, settled.transaction)
            return TickResult("Job started (reconciled)")
        with deps.store.session() as s:
            repo.update_payment(
                s, payment.id, status=PaymentStatus.completed, x402_tx_id=settled.transaction
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
        _record_started(deps, job, payment, vendor, vjob, tx)
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


async def _poll(deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor) -> TickResult:
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
    with deps.store.session() as s:
        for line in new_lines:
            repo.add_observation(s, job.run_id, OBS.job_log, line, vendor_id=vendor.vendor_id)
        repo.update_job(s, job.id, log_cursor=len(vjob.logs), progress=vjob.progress)
        repo.update_run(s, job.run_id, progress=vjob.progress)
        if vjob.status == "completed":
            repo.update_job(
                s,
                job.id,
                status=JobStatus.completed,
                metrics=vjob.metrics,
                artifact_url=vjob.artifact_url,
                actual_cost=job.expected_cost,
                completed_at=now,
            )
            repo.update_run(s, job.run_id, status=RunStatus.completed, progress=1.0)
            repo.record_vendor_outcome(
                s, vendor.vendor_id, success=True, gpu_hours=float(job.job_params.get("hours", 1))
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
    if vjob.status in ("failed", "cancelled"):
        reason = vjob.error or f"job {vjob.status} by the vendor"
        return _fail_job(deps, job, vendor, reason, progress=vjob.progress)
    return TickResult(f"Job running ({vjob.progress:.0%})")


# --- failures ------------------------------------------------------------------------------


def _penalize(deps: AgentDeps, s: Session, vendor: Vendor) -> None:
    repo.record_vendor_outcome(
        s,
        vendor.vendor_id,
        success=False,
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
) -> TickResult:
    with deps.store.session() as s:
        repo.update_job(
            s,
            job.id,
            status=JobStatus.failed,
            error_message=reason,
            completed_at=utcnow(),
            **({"progress": progress} if progress is not None else {}),
        )
        if vendor is not None and penalize:
            _penalize(deps, s, vendor)
        where = f" at {progress:.0%}" if progress is not None else ""
        repo.add_observation(
            s,
            job.run_id,
            OBS.error,
            f"{job.vendor_id} failed{where}: {reason}",
            vendor_id=job.vendor_id,
        )
    return TickResult("Job failed")


def _vendor_trouble(
    deps: AgentDeps, run_id: str, vendor: Vendor, message: str, *, penalize: bool
) -> None:
    with deps.store.session() as s:
        repo.add_observation(s, run_id, OBS.error, message, vendor_id=vendor.vendor_id)
        if penalize:
            _penalize(deps, s, vendor)
