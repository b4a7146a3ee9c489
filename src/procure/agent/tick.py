"""The tick: one stateless step of a run's state machine. It loads the run's whole state from
the store, decides, acts, and writes back; it holds nothing between calls.

Side effects are two-phase: the intent (job `submitted`, payment `pending`, with idempotency key
and nonce) is written before calling out, the outcome after. A tick that finds an intent left by
a crash reconciles it with the vendor and the facilitator before doing anything new.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from eth_account.signers.local import LocalAccount
from sqlalchemy.orm import Session

from procure.agent.context import PlanContext
from procure.agent.guard import check_action, check_quote
from procure.agent.planner import DETERMINISTIC, Planner, heuristic_planner
from procure.models import (
    ACTIVE_JOB_STATUSES,
    TERMINAL_RUN_STATUSES,
    Action,
    Job,
    JobStatus,
    ObservationType,
    Payment,
    PaymentStatus,
    RunStatus,
    Vendor,
    format_usd,
    utcnow,
)
from procure.payments.payer import PaymentLimits, build_payer, check_requirements, payment_nonce
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
    return await _submit(deps, job, payment, vendor)


# --- submitting and paying -----------------------------------------------------------------


async def _submit(deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor) -> TickResult:
    limits = PaymentLimits(
        max_amount=payment.amount,
        pay_to=vendor.pay_to,
        asset=vendor.asset,
        network=vendor.network or "eip155:*",
    )
    payer = build_payer(deps.account, payment.nonce, limits)
    try:
        submitted = await deps.vendors.submit(
            vendor,
            job.quote_id or "",
            idempotency_key=job.idempotency_key,
            job_params=job.job_params,
            payer=payer,
        )
    except PaymentRefused as exc:
        reasons = [r for r in (check_requirements(o, limits) for o in exc.offered) if r]
        return await _payment_refused(
            deps, job, payment, vendor, reasons[0] if reasons else str(exc)
        )
    except VendorError as exc:
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
    tx = submitted.tx_hash
    if tx is None:  # an idempotent replay answers without a new settlement: ask the ledger
        tx = await _settled_tx(deps, payment)
    _record_started(deps, job, payment, vendor, submitted.job, tx)
    return TickResult("Job started")


async def _payment_refused(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, reason: str
) -> TickResult:
    # A refused or failed settlement may still have used the nonce (e.g. an earlier attempt
    # settled before a crash): only the ledger can tell whether money moved.
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError as exc:
        with deps.store.session() as s:
            repo.add_observation(s, job.run_id, OBS.error, f"Payment outcome unknown: {exc}")
        return TickResult("Payment outcome unknown")
    if settled.used:
        with deps.store.session() as s:
            repo.update_payment(
                s, payment.id, status=PaymentStatus.completed, x402_tx_id=settled.transaction
            )
            repo.refresh_budget(s, job.run_id)
        return await _reconcile_after_paid(deps, job, vendor, settled.transaction)
    with deps.store.session() as s:
        repo.update_payment(s, payment.id, status=PaymentStatus.failed, error_message=reason)
        repo.update_job(
            s, job.id, status=JobStatus.failed, error_message=f"payment refused: {reason}"
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
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, vjob: VendorJob, tx: str | None
) -> None:
    with deps.store.session() as s:  # phase two: the outcome
        repo.update_payment(s, payment.id, status=PaymentStatus.completed, x402_tx_id=tx)
        remaining = repo.refresh_budget(s, job.run_id)
        repo.update_job(
            s, job.id, status=JobStatus.running, vendor_job_id=vjob.job_id, progress=vjob.progress
        )
        repo.add_observation(
            s,
            job.run_id,
            OBS.payment_event,
            f"Paid {format_usd(payment.amount)} to {vendor.vendor_id} via x402 "
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
    try:
        vjob = await deps.vendors.status(vendor, idempotency_key=job.idempotency_key)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    if payment is None:  # no live payment: the job can never have been paid for
        return _fail_job(deps, job, vendor, "job has no payment", penalize=False)
    if vjob is not None:  # the vendor took it (it records only paid jobs)
        if payment.status == PaymentStatus.pending:
            tx = await _settled_tx(deps, payment)
            _record_started(deps, job, payment, vendor, vjob, tx)
        else:
            with deps.store.session() as s:
                repo.update_job(s, job.id, status=JobStatus.running, vendor_job_id=vjob.job_id)
        return TickResult("Job started (reconciled)")
    if payment.status == PaymentStatus.completed:
        return _fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError as exc:
        with deps.store.session() as s:
            repo.add_observation(s, job.run_id, OBS.error, f"Cannot reconcile yet: {exc}")
        return TickResult("Payment outcome unknown")
    if settled.used:
        with deps.store.session() as s:
            repo.update_payment(
                s, payment.id, status=PaymentStatus.completed, x402_tx_id=settled.transaction
            )
            repo.refresh_budget(s, job.run_id)
        return _fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
    # Neither paid nor started: submit again, with the same key and the same nonce.
    return await _submit(deps, job, payment, vendor)


async def _reconcile_after_paid(
    deps: AgentDeps, job: Job, vendor: Vendor, tx: str | None
) -> TickResult:
    try:
        vjob = await deps.vendors.status(vendor, idempotency_key=job.idempotency_key)
    except VendorError:
        return TickResult("Payment settled; job state unknown")
    if vjob is None:
        return _fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
    with deps.store.session() as s:
        repo.update_job(s, job.id, status=JobStatus.running, vendor_job_id=vjob.job_id)
    return TickResult("Job started (reconciled)")


# --- watching a running job ----------------------------------------------------------------


async def _poll(deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor) -> TickResult:
    try:
        vjob = await deps.vendors.status(vendor, vendor_job_id=job.vendor_job_id)
    except VendorError as exc:
        _vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
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
