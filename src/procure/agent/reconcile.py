"""Reconciling an intent left by a crash or a lost answer: the ledger says whether money moved, the
vendor whether it runs the job; and payments left in doubt on runs that have ended."""

from __future__ import annotations

from procure.agent.context import PlanContext
from procure.agent.deps import OBS, AgentDeps, TickResult
from procure.agent.outcomes import (
    authorization_expired,
    fail_job,
    may_be_unbooked,
    paid_values,
    settlement_of,
    settling_wait,
    valid_until,
    vendor_trouble,
    worth_sending,
)
from procure.agent.submit import confirm_started, record_started, submit
from procure.crashpoints import crash_point
from procure.models import (
    Job,
    PaymentStatus,
    Vendor,
    format_usd,
)
from procure.payments.settlements import SettlementLookupError
from procure.store import repo
from procure.vendors.client import VendorError


async def reconcile(
    deps: AgentDeps, ctx: PlanContext, job: Job, vendor: Vendor, *, resubmit: bool = True
) -> TickResult:
    """The fate of a job left `submitted`. `resubmit`: when neither paid nor started, submit it
    again (same key, same authorisation); False (the run is being cancelled): wait for the
    authorisation to expire instead."""
    payment = next(
        (p for p in ctx.state.payments if p.job_id == job.id and p.status != PaymentStatus.failed),
        None,
    )
    if payment is None:  # no live payment: the job can never have been paid for
        return fail_job(deps, job, vendor, "job has no payment", penalize=False)
    if payment.status == PaymentStatus.completed:
        return await confirm_started(deps, job, vendor, payment.x402_tx_id)
    # The ledger first: it alone says whether money moved, and it answers when the vendor is down.
    try:
        settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
    except SettlementLookupError as exc:
        note = f"Cannot reconcile yet: {exc}"
        with deps.store.session() as s:  # said once while the outage lasts, not every tick
            if note not in repo.recent_contents(s, job.run_id, 20):
                repo.add_observation(s, job.run_id, OBS.error, note)
        return TickResult("Payment outcome unknown")
    if settled.used:
        try:
            vjob = await deps.vendors.status(
                vendor, idempotency_key=job.idempotency_key, quote_id=job.quote_id
            )
        except VendorError as exc:
            vjob, trouble = None, exc
        else:
            trouble = None
        if vjob is None and payment.ask_again_at is not None and may_be_unbooked(deps, payment):
            # It asked for time to settle it and may not have booked it yet: not "no record".
            return TickResult(  # bounded by the grace: neither progress nor trouble
                f"Waiting for {vendor.vendor_id} to book a settled payment "
                f"(it asked for time until {payment.ask_again_at:%H:%M:%S} UTC)"
            )
        crash_point("reconciled")
        if vjob is not None:
            started = record_started(
                deps,
                job,
                payment,
                vendor,
                vjob,
                settled.transaction,
                settled.amount,
                reconciled=True,
            )
            return TickResult("Job started (reconciled)" if started else "Job failed")
        with deps.store.session() as s:
            repo.update_payment(
                s, payment.id, **paid_values(payment, settled.transaction, settled.amount)
            )
            repo.refresh_budget(s, job.run_id)
        if trouble is not None:  # paid; the job's fate waits for the vendor to answer
            vendor_trouble(
                deps, job.run_id, vendor, f"{vendor.vendor_id} {trouble}", penalize=False
            )
            return TickResult("Payment settled; job state unknown")
        return fail_job(deps, job, vendor, "vendor was paid but has no record of the job")
    waiting = settling_wait(deps, payment)  # unsettled, and its vendor asked for time
    if waiting is not None:
        return waiting
    if authorization_expired(deps, payment):
        # Unused and expired: nothing can ever settle it, and unpaid, no vendor runs the job.
        crash_point("reconciled")
        refused = f" ({payment.error_message})" if payment.error_message else ""
        reason = (
            f"payment authorisation expired unused at {valid_until(deps, payment)}{refused}; "
            "no money moved"
        )
        with deps.store.session() as s:
            repo.update_payment(s, payment.id, status=PaymentStatus.failed, error_message=reason)
        return fail_job(deps, job, vendor, reason, penalize=False)
    try:
        vjob = await deps.vendors.status(
            vendor, idempotency_key=job.idempotency_key, quote_id=job.quote_id
        )
    except VendorError as exc:
        vendor_trouble(deps, job.run_id, vendor, f"{vendor.vendor_id} {exc}", penalize=False)
        return TickResult("Vendor error")
    if vjob is not None:  # the vendor took it (it records only paid jobs): it settled just now
        tx, amount = await settlement_of(deps, payment)
        crash_point("reconciled")
        started = record_started(deps, job, payment, vendor, vjob, tx, amount, reconciled=True)
        return TickResult("Job started (reconciled)" if started else "Job failed")
    settling = payment.ask_again_at is not None
    if settling and not worth_sending(deps, payment):
        # Too late to be accepted if sent again: the ledger decides, at its expiry at the latest.
        return TickResult(f"Payment in doubt until {valid_until(deps, payment)} (expiring)")
    if payment.error_message and not settling:  # refused after signing: wait for its fate
        return TickResult(f"Payment in doubt until {valid_until(deps, payment)}")
    if not resubmit:
        return TickResult(f"Payment in doubt until {valid_until(deps, payment)} (cancelling)")
    # Neither paid nor started (or its vendor's Retry-After is over): submit again, with the
    # same key and the same authorisation.
    return await submit(deps, job, payment, vendor, first_attempt=False)


async def settle_ended_runs(deps: AgentDeps, *, limit: int = 50) -> int:
    """Record the fate of payments left pending on runs that have ended (a signed authorisation
    refused but still valid when the run finished elsewhere): completed if the ledger shows
    the nonce used, failed once it expired unused. Nobody ticks an ended run, so the worker
    calls this now and then. Returns how many were settled."""
    with deps.store.session() as s:
        payments = repo.pending_payments_of_ended_runs(s, limit=limit)
    settled_count = 0
    for payment in payments:  # cloud reservations left out: the cloud path books them
        try:
            settled = await deps.ledger.lookup(deps.account.address, payment.nonce)
        except SettlementLookupError:
            continue
        if settled.used:
            values = paid_values(payment, settled.transaction, settled.amount)
            note = f"settled after all (tx {settled.transaction})"
        elif authorization_expired(deps, payment):
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
