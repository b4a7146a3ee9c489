"""Paying as a job runs: buy the next slice (its own payment, nonce and idempotency key), retry one
left pending by a crash, and settle slice payments in doubt."""

from __future__ import annotations

from procure.agent import slices
from procure.agent.context import PlanContext, deadline_passed
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.agent.guard import check_renewal, check_renewal_hours
from procure.agent.ledger import spend_cap_blocks
from procure.agent.outcomes import (
    authorization_expired,
    booked,
    new_payment,
    paid_values,
    payer_for,
    payment_limits,
    retry_time,
    seller_settling,
    settlement_of,
    valid_until,
    vendor_trouble,
    worth_sending,
)
from procure.crashpoints import crash_point
from procure.models import (
    ACTIVE_JOB_STATUSES,
    Job,
    JobSpec,
    JobStatus,
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
    check_requirements,
)
from procure.payments.settlements import SettlementLookupError
from procure.store import repo
from procure.vendors.client import PaymentInDoubt, PaymentRefused, VendorError


def _slice_key(payment: Payment) -> str:
    return f"slice-{payment.id}"  # one idempotency key per slice, stable across retries


async def renew(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, paid: float
) -> TickResult:
    """Buy the job's next slice: quote, guard, intent, then pay (its own nonce and key)."""
    hours = slices.next_slice_hours(job, paid)
    spec = JobSpec.model_validate(job.job_params).model_copy(update={"hours": hours})
    try:
        quote = await deps.vendors.quote(vendor, spec, job_id=job.vendor_job_id)
    except VendorError as exc:
        vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    left = slices.job_hours(job) - paid
    sold = [
        p.hours
        for p in ctx.state.payments
        if p.job_id == job.id and p.status == PaymentStatus.completed and p.hours is not None
    ]
    rejection = check_renewal(ctx, job, quote) or check_renewal_hours(
        quote, left, min(sold) if sold else None
    )
    if rejection is not None:  # the job runs out its paid time; then the run moves on
        return TickResult(f"Slice not bought: {rejection}")
    # What is paid for is what the vendor sold (its quote's hours, maybe its minimum, more
    # than asked): recorded so, the next renewal comes when these hours are used up.
    payment = new_payment(job.run_id, job.id, vendor, quote.amount, quote.hours)
    sold_more = (
        f"; asked for {hours:g}h, {vendor.vendor_id} sells at least {quote.hours:g}h"
        + (
            f" ({quote.hours - left:g}h more than the job needs, paid and not run)"
            if quote.hours > left + slices.EPS
            else ""
        )
        if quote.hours > hours + slices.EPS
        else ""
    )
    first = slices.first_slice_of(job)
    proved = (
        f"; it has run half of its short first slice of {first:g}h, so it is paid in full "
        "slices from now on"
        if first is not None and paid <= first + slices.EPS
        else ""
    )
    with deps.store.session() as s:  # phase one: the intent
        repo.update_run(s, job.run_id)  # write-lock the run, then check what is committed
        state = repo.load_state(s, job.run_id, observations=False)
        conflict = _slice_conflict(state, job, quote, paid)
        if conflict is None and spend_cap_blocks(deps, s, job.run_id, quote.amount, "a slice"):
            # The job runs out its paid time and stops at its checkpoint; the run then waits.
            return TickResult("Slice not bought: the global spend cap would be exceeded")
        if conflict is not None:
            repo.add_observation(s, job.run_id, OBS.error, f"Not buying a slice: {conflict}")
            return TickResult("State changed")
        repo.insert_payment(s, payment)
        repo.add_observation(
            s,
            job.run_id,
            OBS.agent_reasoning,
            f"Renewing {vendor.vendor_id}: {format_usd(quote.amount)} for the next "
            f"{quote.hours:g}h ({paid:g}h of {slices.job_hours(job):g}h paid so far)"
            + sold_more
            + proved,
            vendor_id=vendor.vendor_id,
        )
    crash_point("intent")
    return await _pay_slice(deps, job, payment, vendor, quote.quote_id, first_attempt=True)


def _slice_conflict(state: RunState | None, job: Job, quote: Quote, paid: float) -> str | None:
    """Why the slice judged due on `paid` hours must not be bought now, from what is committed
    (read under the run's write lock); None when nothing stands in its way."""
    if state is None or state.run.status != RunStatus.running:
        return "the run is no longer running"
    if state.run.cancel_requested_at is not None:  # asked while this tick quoted: no new money
        return "the run is being cancelled"
    if deadline_passed(state.run):  # it passed while this tick quoted: not one cent more
        return "the run's deadline passed"
    current = next((j for j in state.jobs if j.id == job.id), None)
    if current is None or current.status != JobStatus.running:
        return "the job is no longer running"
    if any(p.job_id == job.id and p.status == PaymentStatus.pending for p in state.payments):
        return "another slice of this job is being paid"
    if slices.paid_hours(current, state.payments) > paid + slices.EPS:
        return "another slice of this job was paid meanwhile"
    committed = sum(
        p.amount
        for p in state.payments
        if p.status in (PaymentStatus.completed, PaymentStatus.pending)
    )
    if committed + quote.amount > state.run.budget_total:
        return f"{format_usd(quote.amount)} more would exceed the budget"
    return None


async def retry_slice(deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor) -> TickResult:
    """A slice whose payment was left pending (a crash, or no answer): pay it again, with the
    same nonce and the same key, so that it is bought at most once."""
    if authorization_expired(deps, payment):
        return await _slice_refused(
            deps, job, payment, vendor, "its authorisation expired", signed=True
        )
    spec = JobSpec.model_validate(job.job_params).model_copy(update={"hours": payment.hours})
    try:
        quote = await deps.vendors.quote(vendor, spec, job_id=job.vendor_job_id)
    except VendorError as exc:
        vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
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
    limits = payment_limits(payment, vendor)
    payer = payer_for(deps, payment, limits)
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
        if isinstance(exc, PaymentInDoubt) and signed:
            # It holds our signature and is settling it: wait as it asks, with the same key.
            what = f"{payment.hours:g}h more of job {job.vendor_job_id}"
            return seller_settling(deps, job, payment, vendor, exc, what)
        if exc.retryable and not isinstance(exc, PaymentRefused):
            with deps.store.session() as s:  # it may have settled: retry with the same nonce
                if isinstance(exc, PaymentInDoubt):  # not before a busy vendor's Retry-After
                    later = retry_time(deps, payment, exc.retry_after_s)
                    repo.update_payment(s, payment.id, ask_again_at=later)
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
    tx, amount = await settlement_of(deps, payment, renewed.tx_hash, renewed.settled_amount)
    _record_slice(deps, job, payment, vendor, tx, amount)
    crash_point("recorded")
    return TickResult("Slice renewed")


def _record_slice(
    deps: AgentDeps,
    job: Job,
    payment: Payment,
    vendor: Vendor,
    tx: str | None,
    amount: int | None,
) -> None:
    """A slice paid: booked at what moved (the signed amount), like a job's first payment."""
    paid = paid_values(payment, tx, amount)
    with deps.store.session() as s:
        repo.update_payment(s, payment.id, **paid)
        remaining = repo.refresh_budget(s, job.run_id)
        repo.add_observation(
            s,
            job.run_id,
            OBS.payment_event,
            f"Paid {format_usd(booked(payment, paid))} to {vendor.vendor_id} via x402 for "
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
        outcome = await settle_in_doubt(deps, job, payment, vendor, reason=reason)
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


async def settle_in_doubt(
    deps: AgentDeps, job: Job, payment: Payment, vendor: Vendor, *, reason: str | None = None
) -> TickResult | None:
    """Ask the ledger about a slice payment that may have settled. None once its fate is
    recorded (completed or failed); else it stays pending and the answer says why."""
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError:
        settled = None
    if settled is not None and settled.used:
        _record_slice(deps, job, payment, vendor, settled.transaction, settled.amount)
        return None
    if reason is None and settled is not None and _ask_again(deps, job, payment):
        # Its vendor's Retry-After is over and the authorisation can still settle: the same
        # request again, with the same key (it replays the slice, or has released the key).
        retried = await retry_slice(deps, job, payment, vendor)
        return None if retried.message in _FATE_RECORDED else retried
    if settled is not None and authorization_expired(deps, payment):
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
                f"until its authorisation expires unused ({valid_until(deps, payment)}) or settles",
                vendor_id=vendor.vendor_id,
            )
    return TickResult(f"Payment in doubt until {valid_until(deps, payment)}")


_FATE_RECORDED = ("Slice renewed", "Slice payment settled or expired", "Slice refused")


def _ask_again(deps: AgentDeps, job: Job, payment: Payment) -> bool:
    """Whether a slice payment its vendor said it was settling is due to be asked about again:
    its `Retry-After` is over, the authorisation could still be accepted and the job runs."""
    until = payment.ask_again_at
    return (
        until is not None
        and job.status == JobStatus.running
        and utcnow() >= until
        and worth_sending(deps, payment)
    )


async def settle_stray_slices(deps: AgentDeps, ctx: PlanContext) -> bool:
    """Slice payments still in doubt on jobs that have ended: record their fate once the ledger
    knows it. True while some are still in doubt."""
    ended = {j.id: j for j in ctx.state.jobs if j.status not in ACTIVE_JOB_STATUSES}
    doubt = False
    for payment in ctx.state.payments:
        job = ended.get(payment.job_id)
        vendor = ctx.vendor(payment.vendor_id)
        if payment.reserves_cloud:
            # A cloud instance's reservation (its job handed to the sweeper), not an x402
            # authorisation: booked from the provider's bill, it does not hold the run up.
            continue
        if payment.status == PaymentStatus.pending and job is not None and vendor is not None:
            doubt = await settle_in_doubt(deps, job, payment, vendor) is not None or doubt
    return doubt
