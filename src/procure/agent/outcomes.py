"""Recording what happened: payments and their authorisation windows (and a vendor still settling
one), failed and stopped jobs, vendor trouble and penalties. Shared by every step of the tick."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session
from x402 import x402Client

from procure.agent import slices
from procure.agent.context import PlanContext
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.models import (
    Job,
    JobStatus,
    Payment,
    PaymentStatus,
    Vendor,
    format_usd,
    utcnow,
)
from procure.payments.payer import (
    PaymentLimits,
    authorization_deadline,
    build_payer,
    payment_nonce,
)
from procure.payments.settlements import SettlementLookupError
from procure.store import repo
from procure.vendors.client import PaymentInDoubt
from procure.vendors.protocol import VendorJob


def payment_limits(payment: Payment, vendor: Vendor) -> PaymentLimits:
    return PaymentLimits(
        max_amount=payment.amount, pay_to=vendor.pay_to, asset=vendor.asset, network=vendor.network
    )


def valid_before(deps: AgentDeps, payment: Payment) -> int:
    return authorization_deadline(payment.created_at, deps.auth_window_s)


def authorization_expired(deps: AgentDeps, payment: Payment) -> bool:
    """Whether the payment's authorisation can no longer be settled by anyone."""
    return time.time() > valid_before(deps, payment) + deps.auth_margin_s


def retry_time(deps: AgentDeps, payment: Payment, retry_after_s: float) -> datetime:
    """When a seller that asked for `retry_after_s` is asked about `payment` again: then, in
    whole seconds, but never past the end of its authorisation (the ledger alone decides after
    it, and a seller's long Retry-After must not hold a run longer)."""
    asked = (utcnow() + timedelta(seconds=retry_after_s, microseconds=999_999)).replace(
        microsecond=0
    )
    last = datetime.fromtimestamp(valid_before(deps, payment) + deps.auth_margin_s, UTC)
    return min(asked, last)


def valid_until(deps: AgentDeps, payment: Payment) -> str:
    return datetime.fromtimestamp(valid_before(deps, payment), UTC).strftime("%H:%M:%S UTC")


VERIFY_LEFT_S = 6.0
"""x402's 'exact' EVM facilitators refuse an authorisation with less than this left before its
`validBefore`: past that, sending it again can only be turned down."""


def worth_sending(deps: AgentDeps, payment: Payment) -> bool:
    """Whether `payment`'s authorisation, sent again, could still be accepted and settled."""
    return time.time() + VERIFY_LEFT_S < valid_before(deps, payment)


BOOKING_GRACE_S = 30.0
"""How long a seller may take to book a payment after the ledger shows it settled (it learns of
it from the ledger too), counted from when it asked to be asked again or, if later, from when
we saw it settle; before then its word that it has no record of the job, or that the job's
paid time ran out, may predate its booking."""


def may_be_unbooked(deps: AgentDeps, payment: Payment) -> bool:
    """Whether `payment`, settled, may not be booked yet by its seller (`BOOKING_GRACE_S`)."""
    asked = payment.ask_again_at or payment.updated_at
    last = datetime.fromtimestamp(valid_before(deps, payment) + deps.auth_margin_s, UTC)
    since = max(payment.updated_at, min(asked, last))
    return utcnow() < since + timedelta(seconds=BOOKING_GRACE_S)


def settling_wait(deps: AgentDeps, payment: Payment) -> TickResult | None:
    """The wait while a vendor's `Retry-After` for `payment` runs (and the authorisation has not
    expired: then the ledger decides at once); None when nothing is to be waited for."""
    until = payment.ask_again_at
    if until is None or utcnow() >= until or authorization_expired(deps, payment):
        return None
    return TickResult(
        f"Payment in doubt: {payment.vendor_id} is still settling it; "
        f"asking again after {until:%H:%M:%S} UTC"
    )


def seller_settling(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, exc: PaymentInDoubt, what: str
) -> TickResult:
    """The vendor holds our signed payment and cannot confirm yet whether it settled: not its
    failure (no penalty, no cool-down, no other vendor) and no reason to pay again. The payment
    stays pending with its nonce and the job's key; the vendor is asked again, with that key,
    only after its `Retry-After` (`settling_wait`), and past the authorisation the ledger
    decides. Said once per episode, not on every answer."""
    not_before = retry_time(deps, payment, exc.retry_after_s)
    told = payment.ask_again_at is not None
    with deps.store.session() as s:
        repo.update_payment(
            s,
            payment.id,
            error_message=f"being settled by {vendor.vendor_id}: {exc}",
            ask_again_at=not_before,
        )
        if not told:
            repo.add_observation(
                s,
                job.run_id,
                OBS.payment_event,
                f"{vendor.vendor_id} {'has' if exc.payment_sent else 'may hold'} the payment "
                f"of {format_usd(payment.amount)} for {what} (sent "
                f"{'now' if exc.payment_sent else 'in an earlier attempt'}) but cannot confirm "
                f"yet that it settled ({exc}). It stays pending "
                "(counted against the budget) and is not paid again: asking again with the "
                f"same key after {not_before:%H:%M:%S} UTC (its Retry-After of "
                f"{exc.retry_after_s:g} s); its authorisation can settle until "
                f"{valid_until(deps, payment)}",
                vendor_id=vendor.vendor_id,
            )
    return TickResult(
        f"Payment in doubt: {vendor.vendor_id} is still settling it; "
        f"asking again after {not_before:%H:%M:%S} UTC"
    )


def payer_for(deps: AgentDeps, payment: Payment, limits: PaymentLimits) -> x402Client:
    """The x402 client for one payment: its own nonce and expiry, behind `limits`."""
    return build_payer(
        deps.account, payment.nonce, limits, valid_before=valid_before(deps, payment)
    )


def new_payment(run_id: str, job_id: str, vendor: Vendor, amount: int, hours: float) -> Payment:
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


async def settlement_of(
    deps: AgentDeps, payment: Payment, tx: str | None = None, amount: int | None = None
) -> tuple[str | None, int | None]:
    """The transaction and the amount that moved for a settled payment: the ledger's where it
    knows them (a vendor's answer may name any hash), else the answer's; the amount given (the
    signed one) only while the ledger cannot say (an idempotent replay answers without a
    settlement). (None, None) parts when neither can say now. A retry signs the same nonce
    again for whatever its 402 asks: the earlier attempt's authorisation, for another amount,
    may be the one that moved money."""
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError:
        return tx, amount
    if not settled.used:
        return tx, amount
    return settled.transaction or tx, settled.amount if settled.amount is not None else amount


def paid_values(payment: Payment, tx: str | None, amount: int | None) -> dict[str, object]:
    """A payment's completion: its transaction and what really moved, the signed amount, which
    may be less than quoted (so the store's sums match the chain's, and the budget shows what
    was spent). Never more: the guardrails sign nothing above the quote."""
    paid: dict[str, object] = {"status": PaymentStatus.completed, "x402_tx_id": tx}
    if payment.ask_again_at is not None:  # "being settled" is over: it was (the time it asked
        paid["error_message"] = None  # for stays: until then it may not have booked it)
        paid["ask_again_at"] = payment.ask_again_at
    if amount is not None and 0 <= amount <= payment.amount:
        paid["amount"] = amount
    return paid


def booked(payment: Payment, values: dict[str, object]) -> int:
    """What `paid_values` books for `payment`."""
    return int(values.get("amount", payment.amount))  # type: ignore[call-overload]


def paid_for(ctx: PlanContext, job: Job) -> int:
    return sum(
        p.amount
        for p in ctx.state.payments
        if p.job_id == job.id and p.status == PaymentStatus.completed
    )


def gpu_hours_run(job: Job, progress: float) -> float:
    """GPU-hours the job ran for, from where it started to `progress` of the run."""
    return max(0.0, progress - job.start_progress) * slices.total_hours(job)


def penalize_vendor(deps: AgentDeps, s: Session, vendor: Vendor, gpu_hours: float = 0.0) -> None:
    """Count a failure against the vendor (with the GPU-hours it ran, for its hazard) and cool
    it down: VENDOR_COOLDOWN_S before any planner may pick it again."""
    repo.record_vendor_outcome(
        s,
        vendor.vendor_id,
        success=False,
        gpu_hours=gpu_hours,
        cooldown_until=utcnow() + timedelta(seconds=deps.cooldown_s),
    )


def fail_job(
    deps: AgentDeps,
    job: Job,
    vendor: Vendor | None,
    reason: str,
    *,
    penalize: bool = True,
    progress: float | None = None,
    ctx: PlanContext | None = None,
) -> TickResult:
    ran = gpu_hours_run(job, progress if progress is not None else job.progress)
    saved = max(job.checkpoint_progress, ctx.resume_progress if ctx else 0.0)
    with deps.store.session() as s:
        repo.update_job(
            s,
            job.id,
            status=JobStatus.failed,
            error_message=reason,
            completed_at=utcnow(),
            **({"progress": progress} if progress is not None else {}),
            **({"actual_cost": paid_for(ctx, job)} if ctx else {}),
        )
        if vendor is not None and penalize:
            penalize_vendor(deps, s, vendor, gpu_hours=ran)
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


def vendor_trouble(
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
            penalize_vendor(deps, s, vendor)
        elif cool:
            repo.cool_down(s, vendor.vendor_id, utcnow() + timedelta(seconds=deps.cooldown_s))


def stop_job(
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
            actual_cost=paid_for(ctx, job),
            completed_at=utcnow(),
        )
        repo.record_vendor_hours(s, vendor.vendor_id, gpu_hours_run(job, vjob.progress))
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
