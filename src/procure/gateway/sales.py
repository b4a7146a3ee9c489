"""What the gateway's routes sell, apart from HTTP: quotes priced from the cloud's (cached)
offers, jobs and renewals written with their pending payment, the booking of a settlement, and
the buyer's view of a job. What is refused before money moves is `refusals.py`'s; a refusal is
`(status, message)`, which `app.py` turns into an answer."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session
from x402.http.utils import decode_payment_response_header

from procure.clouds.base import CloudError, Offer
from procure.crashpoints import crash_point
from procure.gateway import book, storelease
from procure.gateway import loop as gateway_loop
from procure.gateway.pricing import amount_for, sell_per_hour, sold_hours
from procure.gateway.refusals import Refusal, below_cost, over_caps
from procure.gateway.runtime import Runtime, paid_end
from procure.models import micros_to_usd, utcnow
from procure.payments.settlements import Settlement, paid_to, settle_refused
from procure.store.gateway_tables import GatewayJobRow, GatewayPaymentRow, GatewayQuoteRow
from procure.store.ledger import fence
from procure.vendors.protocol import IDEMPOTENCY_HEADER, VendorJob

OFFERS_TTL_S = 5.0


def view(row: GatewayJobRow) -> dict[str, Any]:
    """The job as `GET /job-status` answers it (the protocol's VendorJob)."""
    status = row.status
    if status in ("unpaid", "paid", "launching", "booting"):
        shown = "cancelled" if row.cancel_requested else "queued"
    elif status in ("running", "ending"):
        shown = row.outcome if status == "ending" and row.outcome else "running"
        shown = "cancelled" if row.cancel_requested else shown
    else:
        shown = status
    done = shown == "completed"
    return VendorJob(
        job_id=row.job_id,
        status=shown,  # type: ignore[arg-type]
        progress=1.0 if done else min(1.0, max(0.0, row.progress)),
        logs=list(row.logs),
        # Where those lines start among all the job's: only the last ones are shown.
        logs_offset=max(0, (row.logs_total or 0) - len(row.logs)),
        metrics={"gpu": row.gpu, "paidHours": row.paid_hours} if done else None,
        artifact_url=row.checkpoint_url if done else None,
        error=row.error if shown == "failed" else None,
        checkpoint_url=row.checkpoint_url,
        checkpoint_progress=row.checkpoint_progress if row.checkpoint_url else None,
        paid_hours=row.paid_hours,
        paid_until=row.paid_until,
        amount=row.amount,
    ).to_json()


def shown(s: Session, row: GatewayJobRow) -> dict[str, Any]:
    """`view`, and what is owed back on the job (`refundOwedUsd`, its renewals that settled
    once it had ended: `book.owe_refund`) when anything is."""
    owed = book.refund_owed(s, row.job_id)
    return {**view(row), "refundOwedUsd": micros_to_usd(owed)} if owed else view(row)


def offer_cache(rt: Runtime) -> Callable[..., Awaitable[list[Any]]]:
    """`offers(gpu)`: the cloud's offers of `gpu`, at most OFFERS_TTL_S old: a buyer asking for
    quotes in a loop cannot drive the gateway into the cloud's rate limits. `fresh`: asked now
    (a paid submit, checked against its quote's cost: only a verified payment reaches it).
    One catalogue is kept for every GPU: every cloud reads its whole catalogue for any GPU, and
    keyed by the name a buyer sends, each made-up name was a new read and a new entry.
    One read at a time, shared by every caller waiting on it: cached only once the cloud had
    answered, each quote asked meanwhile read it again (40 quotes asked together, 40 calls on
    the account whose rate limits its launches and terminates share). A `fresh` caller takes a
    read begun after it asked. A read that failed fails every caller that waited on it: each
    reading the cloud again in turn, a paid submit waited behind one timeout per quote."""
    cache: list[tuple[float, list[Any]]] = []
    failed: list[tuple[float, CloudError]] = []  # the last read's failure, and when it ended
    reading = asyncio.Lock()

    async def offers(gpu: str, *, fresh: bool = False) -> list[Any]:
        clock = asyncio.get_running_loop().time
        asked = clock()
        async with reading:
            if not cache or (fresh and cache[0][0] < asked) or asked - cache[0][0] > OFFERS_TTL_S:
                if failed and failed[0][0] >= asked:
                    raise failed[0][1]  # the read it waited on failed: not asked again
                begun = clock()
                try:
                    cache[:] = [(begun, await rt.cloud.offers())]
                except CloudError as exc:
                    failed[:] = [(clock(), exc)]
                    raise
                failed.clear()
            return [o for o in cache[0][1] if o.gpu == gpu.upper()]  # as `best_offer` matches

    return offers


def own_checkpoint(rt: Runtime, s: Session, url: str | None, payer: str) -> str | None:
    """A checkpoint to resume from, only if this gateway wrote it (under its checkpoint
    directory) for a job of this buyer (its folder is the job's id): a buyer can point the node
    neither at any other file or host nor at another buyer's work."""
    if not url or len(url) > 500 or ".." in url or "\x00" in url:
        return None
    root = rt.cfg.checkpoint_dir.rstrip("/") + "/"
    if not url.startswith(root):
        return None
    owner = s.get(GatewayJobRow, url[len(root) :].split("/", 1)[0])
    return url if owner is not None and owner.payer == payer.lower() else None


# --- quotes ----------------------------------------------------------------------------------


def make_room_for_a_quote(rt: Runtime, now: datetime) -> None:
    """Expired quotes purged, and with as many open as the gateway allows, the oldest go: the
    cap bounds the book, but a quote needs no payment and the cap is every buyer's, so refusing
    new quotes once it was full let one buyer asking in a loop lock every other out. A quote
    dropped so is refused (unknown) before any money moves; its buyer asks again."""
    with rt.store.session() as s:
        book.purge_quotes(s, now)
        over = book.open_quotes(s, now) - rt.cfg.max_open_quotes + 1
        if over > 0:
            book.drop_oldest_quotes(s, now, over)


def new_quote(
    rt: Runtime, gpu: str, gpu_type: str, hours_asked: float, offer: Offer, now: datetime
) -> dict[str, Any]:
    """Quote `offer` plus the margin for `hours_asked` of `gpu` (asked for as `gpu_type`): the
    quote is written and its answer returned."""
    cfg = rt.cfg
    per_hour = sell_per_hour(offer.price_per_hour, cfg.margin)
    # The instance this sells is billed by the cloud's increment however little of it is
    # used: sell at least one increment (a buyer stopping early would leave the gateway
    # paying for the rest), and say so in the quote's hours.
    hours = sold_hours(hours_asked, offer.billing_increment_s, cfg.min_sale_s)
    amount = amount_for(per_hour, hours)
    expires = now + timedelta(seconds=cfg.quote_valid_s)
    row = GatewayQuoteRow(
        quote_id=f"q_{uuid.uuid4().hex[:16]}",
        gpu=gpu,
        hours=hours,
        price_per_hour=per_hour,
        amount=amount,
        cost_per_hour=offer.price_per_hour,
        offer={"region": offer.region, "offerId": offer.offer_id},
        expires_at=expires,
        created_at=now,
    )
    with rt.store.session() as s:
        s.add(row)
    return {
        "quoteId": row.quote_id,
        "vendorId": cfg.vendor_id,
        "gpuType": gpu_type,
        "hours": hours,
        "pricePerHour": micros_to_usd(per_hour),
        "amount": micros_to_usd(amount),
        "currency": "USD",
        "expiresAt": expires.isoformat(),
        "validForSeconds": cfg.quote_valid_s,
    }


# --- jobs and renewals, written before the payment settles -----------------------------------


def new_job(
    rt: Runtime,
    quote: GatewayQuoteRow,
    auth: dict[str, Any],
    key: str,
    params: dict[str, Any],
    checkpoint_url: str | None,
    free: int,
) -> Refusal | dict[str, Any]:
    """The job `quote` sells, written `unpaid` with its payment `pending` unless the payment
    was used, a cap is reached or the `free` GPUs the cloud shows are all sold already; its
    view, or the refusal."""
    cfg = rt.cfg
    now = utcnow()
    with rt.store.session() as s:  # no await from the caps' count to the insert
        # Another gateway process on this store counts after this insert, not beside it.
        fence(s)
        if not storelease.ours(s, cfg):
            return 503, "this gateway no longer holds its store (another gateway runs on it)"
        if book.nonce_seen(s, auth["nonce"]):
            return 409, "this payment was already used"
        held = book.live_jobs_of(s, auth["from"])
        if held >= cfg.max_instances:
            return 429, f"this buyer already holds {held} jobs (max {cfg.max_instances})"
        if book.live_jobs(s) >= cfg.max_live_jobs:
            return 503, "the gateway is full; try again later"
        # The operator's caps over all buyers, counting every job sold and not yet launched as
        # the last GPU is reserved: buyers paying together cannot pass them together.
        refusal = over_caps(rt, s, quote.price_per_hour)
        if refusal is not None:
            return refusal
        # A job sold a moment ago still shows its GPU free until its launch lands: the last
        # one sold twice left the second buyer paid for a job no launch could place.
        if book.waiting_jobs(s, quote.gpu) >= free:
            return 409, "no capacity available (the free GPUs are sold, launching)"
        resume = own_checkpoint(rt, s, checkpoint_url, auth["from"])
        row = GatewayJobRow(
            job_id=f"gw-{uuid.uuid4().hex[:16]}",
            key=key,
            quote_id=quote.quote_id,
            gpu=quote.gpu,
            payer=auth["from"].lower(),
            nonce=auth["nonce"],
            params=params,
            resume_from=resume,
            status="unpaid",
            paid_hours=0.0,
            amount=0,
            attempt=0,
            tried_regions=[],
            progress=0.0,
            logs=[f"[gateway] job accepted for {quote.gpu}, {quote.hours:g} h"],
            logs_total=1,
            log_cursor=0,
            cancel_requested=0,
            created_at=now,
            updated_at=now,
        )
        if checkpoint_url and resume is None:
            book.note(row, "[gateway] checkpoint not from this gateway; starting afresh", 200)
        s.add(row)
        book.add_payment(
            s,
            nonce=auth["nonce"],
            job_id=row.job_id,
            kind="submit",
            key=key,
            payer=auth["from"],
            amount=auth["value"],
            hours=quote.hours,
        )
        return view(row)


def new_renewal(
    rt: Runtime, job_id: str, quote: GatewayQuoteRow, auth: dict[str, Any], key: str
) -> Refusal | None:
    """The renewal of `job_id` that `quote` sells, its payment written `pending`, unless the
    payment was already used or the quote sells below what the job's instance costs."""
    with rt.store.session() as s:
        # Fenced as a sale is: a renewal written as another gateway takes the store is either
        # counted by its claim (a pending payment) or refused here, never slipped in after.
        fence(s)
        if not storelease.ours(s, rt.cfg):  # a renewal may revive an ended job
            return 503, "this gateway no longer holds its store (another gateway runs on it)"
        if book.nonce_seen(s, auth["nonce"]):
            return 409, "this payment was already used"
        row = book.job(s, job_id)
        # A boot is not the buyer's time (`runtime.mark_running`): its paid time starts, or goes
        # on, once the job runs.
        booting = row is not None and row.status == "booting"
        if row is not None and not booting and utcnow() > paid_end(rt, row):
            # The loop ends it at its next look (nothing a renewal made now could hold).
            return 409, f"job {job_id}'s paid time ran out; it is ending"
        # Checked before its 402 too; again here, where the payment is written (an instance
        # replaced meanwhile may cost more).
        refusal = below_cost(rt, s, job_id, quote)
        if refusal is not None:
            return refusal
        book.add_payment(
            s,
            nonce=auth["nonce"],
            job_id=job_id,
            kind="renew",
            key=key,
            payer=auth["from"],
            amount=auth["value"],
            hours=quote.hours,
        )
    return None


def request_cancel(rt: Runtime, job_id: Any) -> dict[str, Any] | None:
    """Mark a started job's cancel as asked (the loop ends it); its view, or None if unknown."""
    with rt.store.session() as s:
        row = book.job(s, job_id) if isinstance(job_id, str) else None
        if row is None or row.status == "unpaid":
            return None
        # One being ended on its node's word (completed, failed) ends so: marked cancelled, a
        # job that had completed read `cancelled` until its instance was gone. (One ending for
        # want of paid time may be revived by a renewal booked late: a cancel still stops it.)
        final = row.status == "ending" and not book.ran_out(row)
        if row.status in book.STARTED and not final and not row.cancel_requested:
            row.cancel_requested = 1
            row.updated_at = utcnow()
        return view(row)


# --- settlement ------------------------------------------------------------------------------

Outcome = Literal["settled", "refused", "unknown", "none"]


async def book_settlement(
    rt: Runtime, kind: str, key: str, nonce: str, payment_response: str | None, status: int
) -> tuple[Outcome, GatewayJobRow | None]:
    """After the SDK's answer (`status`, its PAYMENT-RESPONSE header) to a paid request: what
    became of the pending payment `nonce` of (`kind`, `key`). `settled`: booked (the answer
    carried a settlement, or the facilitator's ledger shows the nonce used); `refused`: the
    facilitator said no and nothing moved, so it is dropped; `unknown`: the settle call failed
    or timed out and the ledger cannot confirm it, so it stays `pending` for `recover_payments`
    (money taken is always booked); `none`: no payment of this request was pending."""
    with rt.store.session() as s:
        ours = book.pending_payment(s, kind, key)
        if ours is None or ours.nonce != nonce:
            return "none", None  # refused before a payment was taken
        payer, amount = ours.payer, ours.amount
    answer = _decoded(payment_response)
    if status < 400 and answer is not None and answer.success:
        crash_point("paid")  # settled, not yet booked: reconciled later
        with rt.store.session() as s:
            row = book.settled(s, nonce, answer.transaction, rt.cfg.hour_s)
        crash_point("recorded")
        rt.wake.set()
        return "settled", row
    found = await _lookup(rt, payer, nonce)
    if found is not None and found.used and not paid_to(found, rt.cfg.pay_to, amount):
        gateway_loop.spent_elsewhere(rt, nonce, found)
        return "refused", None
    if found is not None and found.used:  # the answer was lost, not the money
        with rt.store.session() as s:
            row = book.settled(s, nonce, found.transaction, rt.cfg.hour_s, found.amount)
        rt.wake.set()
        return "settled", row
    refused = answer is not None and settle_refused(answer.error_reason)
    known_unused = found is not None or rt.ledger is None  # no ledger: the facilitator's word
    if known_unused and (refused or (answer is None and status in ROUTE_REFUSALS)):
        with rt.store.session() as s:
            book.unsettled(s, nonce)
        return "refused", None
    return "unknown", None


# What the route itself answers when it turns a request down: the SDK settles nothing then.
ROUTE_REFUSALS = frozenset({400, 401, 403, 404, 409, 413, 422, 429})


def _decoded(header: str | None) -> Any:
    if not header:
        return None
    try:
        return decode_payment_response_header(header)
    except Exception:
        return None


async def _lookup(rt: Runtime, payer: str, nonce: str) -> Settlement | None:
    """The facilitator's record of `nonce`, or None when there is no ledger or it cannot say."""
    if rt.ledger is None:
        return None
    try:
        return await rt.ledger.lookup(payer, nonce)
    except Exception:  # SettlementLookupError, or a ledger that broke: it cannot say
        return None


def retry_after_s(rt: Runtime) -> int:
    """When a buyer should ask again about a payment still being settled: the loop's next
    reconciliation."""
    return max(1, min(30, round(rt.cfg.sweep_every_s) + 1))


async def recheck(rt: Runtime, nonce: str, payer: str) -> bool:
    """A payment left pending (a crash, a lost settle answer): settled → booked now; unused
    past the authorisation window → dropped; else it stays pending. Whether it settled."""
    found = await _lookup(rt, payer, nonce)
    with rt.store.session() as s:
        payment = s.get(GatewayPaymentRow, nonce)
        amount = payment.amount if payment is not None else None
    if found is None or amount is None:
        return False
    if found.used and not paid_to(found, rt.cfg.pay_to, amount):
        gateway_loop.spent_elsewhere(rt, nonce, found)
        return False
    with rt.store.session() as s:
        if found.used:
            book.settled(s, nonce, found.transaction, rt.cfg.hour_s, found.amount)
        else:
            payment = s.get(GatewayPaymentRow, nonce)
            age = (utcnow() - payment.created_at).total_seconds() if payment else 0.0
            # The settle may still be on its way: only an authorisation that can no longer
            # be used is safe to forget.
            if age > gateway_loop.AUTH_WINDOW_S:
                book.unsettled(s, nonce)
    if found.used:
        rt.wake.set()
    return found.used


async def pending_retry(rt: Runtime, kind: str, key: str) -> Refusal | None:
    """A request with key `key` while an earlier payment of it is still being settled: refused
    (409, with when to ask again) so the buyer never pays twice; None when none is pending."""
    with rt.store.session() as s:
        pending = book.pending_payment(s, kind, key)
    if pending is None:
        return None
    return 409, (
        f"the payment for this {IDEMPOTENCY_HEADER} is still being settled; retry with the "
        f"same key in {retry_after_s(rt)} s (an unused authorisation is released after "
        f"{gateway_loop.AUTH_WINDOW_S:g} s)"
    )


def not_its_job(
    rt: Runtime, key: str, auth: dict[str, Any] | None, quote_ids: set[Any]
) -> Refusal | None:
    """Why a submit with `key`, whose job exists, is not that job's buyer asking again (so is not
    answered it), or None. Keys are chosen by buyers and were shared by all of them: another's
    key handed over its job (id, logs, checkpoint, cancellable with the shared bearer) as a
    replay, nothing paid. Its buyer asks again with the job's own quote (quote ids go only to
    whoever asked) or with the payment it was bought with; a payment signed by another payer is
    never answered it. Refused before any money moves."""
    with rt.store.session() as s:
        row = book.job_by_key(s, key)
        if row is None:
            return None
        payer, nonce, quote_id = row.payer, row.nonce, row.quote_id
    if auth is not None and str(auth["from"]).lower() != payer:
        return 409, f"this {IDEMPOTENCY_HEADER} was used by another buyer: choose your own key"
    if quote_id in quote_ids or (auth is not None and auth["nonce"] == nonce):
        return None
    return 409, f"this {IDEMPOTENCY_HEADER} was used for another quote's job: choose a new key"


def key_shows_job(rt: Runtime, key: str, quote_id: str | None) -> bool:
    """Whether a status asked by idempotency key `key` may answer its job: only with the job's
    own quote (`quoteId`), as a submit replay is (`not_its_job`). Keys are the buyers' choice
    and guessable (procure's agent names them `job-<id>`), and the buyers' bearer is shared: by
    key alone anyone saw another buyer's job (its id, logs, checkpoint) and with the id could
    cancel it. Quote ids go only to the buyer that asked; a wrong one is told nothing more than
    an unknown key."""
    if not quote_id:
        return False
    with rt.store.session() as s:
        row = book.job_by_key(s, key)
        owned = row.quote_id if row is not None else ""
    return bool(owned) and hmac.compare_digest(owned.encode(), quote_id.encode())


async def replayed(rt: Runtime, kind: str, key: str) -> dict[str, Any] | None:
    """The view of the job an earlier paid request (`kind`, `key`) bought, or None if none
    did; a payment of it a crash left pending is reconciled first."""
    with rt.store.session() as s:
        pending = book.pending_payment(s, kind, key)
    if pending is not None:  # a crash between settlement and booking, or a lost answer
        await recheck(rt, pending.nonce, pending.payer)
    with rt.store.session() as s:
        row = book.job_by_key(s, key) if kind == "submit" else book.renewed_job(s, key)
        if row is None or row.status == "unpaid":
            return None
        return shown(s, row)
