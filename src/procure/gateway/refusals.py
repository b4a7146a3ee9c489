"""What the gateway refuses before any money moves, and why: a quote not for this request, a
payment that does not match its quote, a sale past the operator's caps over all buyers, a
renewal below what its job's instance costs; and the offers a quote or a renewal is priced on
when the cloud shows none free. A refusal is `(status, message)`; `app.py` answers it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from procure.clouds.base import Offer
from procure.gateway import book
from procure.gateway.pricing import sell_per_hour
from procure.gateway.runtime import Runtime
from procure.models import format_usd, micros_to_usd, usd_to_micros, utcnow
from procure.store.gateway_tables import GatewayQuoteRow
from procure.vendors.protocol import QUOTE_HEADER

Refusal = tuple[int, str]


def quote_refusal(rt: Runtime, quote_id: Any, named: str | None, gpu: str | None) -> str | None:
    """Why a paid request's quote (`quote_id` in its body, `named` in its quote header) cannot
    be paid for a job on `gpu` (None: any), or None."""
    if not isinstance(quote_id, str) or named != quote_id:
        return f"the {QUOTE_HEADER} header must name the body's quoteId"
    with rt.store.session() as s:
        quote = book.get_quote(s, quote_id)
    if quote is None:
        return f"unknown quote {quote_id[:40]}"
    if quote.expires_at <= utcnow():
        return f"quote {quote_id} expired; ask for a new one"
    if gpu is not None and quote.gpu != gpu:
        return f"quote {quote_id} is for {quote.gpu}, the job runs on {gpu}"
    return None


# The 402's maxTimeoutSeconds (300) and a little clock skew. A payment still unsettled is
# dropped `gateway_loop.AUTH_WINDOW_S` (330) after it was written: one whose authorisation
# outlived that could settle after, with nobody left to book it.
MAX_VALID_S = 305.0


def payment_refusal(
    rt: Runtime, auth: dict[str, Any] | None, quote: GatewayQuoteRow
) -> Refusal | None:
    """Why a payment cannot buy `quote` (none, another amount, an expired quote, a nonce
    already used), or None; checked before the job is written, as the money is taken after."""
    if auth is None:
        return 402, "no payment"
    if auth["value"] != quote.amount:
        return 400, "the payment is not for the quoted amount"
    if float(auth.get("validBefore") or 0) > utcnow().timestamp() + MAX_VALID_S:
        return 400, (
            f"the payment's authorisation stays valid more than {MAX_VALID_S:g} s "
            "(the 402's maxTimeoutSeconds is 300): sign it for at most that"
        )
    if quote.expires_at <= utcnow():
        return 409, f"quote {quote.quote_id} expired; ask for a new one"
    with rt.store.session() as s:
        if book.nonce_seen(s, auth["nonce"]):
            return 409, "this payment was already used"
    return None


def over_caps(rt: Runtime, s: Session, per_hour: int) -> Refusal | None:
    """Why one more sold job, at `per_hour` (micro-USD: its sale price, the most a launch of
    it may cost), would take the gateway past its caps over all buyers (`max_total_instances`,
    `max_hourly_usd`), or None. Answered as the gateway being full (503, no Retry-After: no
    payment of the buyer is in doubt)."""
    cfg = rt.cfg
    spend, instances = book.committed(s)
    if instances + 1 > cfg.max_total_instances:
        return 503, (
            f"the gateway is full: {instances} instances held or sold over all buyers (its cap "
            f"is {cfg.max_total_instances}); try again later"
        )
    cap = usd_to_micros(cfg.max_hourly_usd)
    if spend + per_hour > cap:
        return 503, (
            f"the gateway is at its spend cap: {format_usd(spend)}/h committed of its "
            f"{format_usd(cap)}/h, and this job adds {format_usd(per_hour)}/h; try again later"
        )
    return None


def sale_refusal(rt: Runtime, quote_id: Any) -> Refusal | None:
    """`over_caps` now for a submit of `quote_id`, before its 402: a clean refusal before the
    buyer signs anything (the paid submit is checked again where its job is written). None for
    a quote no longer known: the route refuses that itself."""
    with rt.store.session() as s:
        quote = book.get_quote(s, quote_id) if isinstance(quote_id, str) else None
        return over_caps(rt, s, quote.price_per_hour) if quote is not None else None


def renewal_floor(rt: Runtime, s: Session, job_id: str) -> tuple[int, int]:
    """(cost, price) per hour, micro-USD: what the instance `job_id` holds costs (the dearest,
    if a replaced one is still held) and the least a renewal of it sells for (that plus the
    margin); (0, 0) while it holds none (its next launch is bounded by its sale)."""
    held = [i.price_per_hour for i in book.instances_of(s, job_id) if i.status in book.HOLDING]
    cost = max(held, default=0)
    return cost, sell_per_hour(cost, rt.cfg.margin) if cost else 0


def renewal_refusal(rt: Runtime, job_id: Any, quote_id: Any) -> Refusal | None:
    """`below_cost` now for a renewal of `job_id` on `quote_id`, before its 402 (nothing to
    sign in vain); None for a job or quote not known: the route refuses those itself."""
    if not isinstance(job_id, str) or not isinstance(quote_id, str):
        return None
    with rt.store.session() as s:
        quote = book.get_quote(s, quote_id)
        if quote is None or book.job(s, job_id) is None:
            return None
        return below_cost(rt, s, job_id, quote)


def below_cost(rt: Runtime, s: Session, job_id: str, quote: GatewayQuoteRow) -> Refusal | None:
    """Why `quote` cannot renew `job_id` at its price, or None. A quote is priced on the
    cheapest offer of its moment, but the job runs on the instance it holds: a quote taken
    before the cloud's price rose (or priced on a cheaper offer than the job's) sold its hours
    below what they cost the gateway. The buyer asks for a quote naming the job instead."""
    cost, floor = renewal_floor(rt, s, job_id)
    if quote.price_per_hour >= floor:
        return None
    return 409, (
        f"job {job_id}'s instance costs ${micros_to_usd(cost):g}/h: a renewal of it sells at "
        f"${micros_to_usd(floor):g}/h, quote {quote.quote_id} at "
        f"${micros_to_usd(quote.price_per_hour):g}/h; ask for a quote with "
        f'"jobId": "{job_id}" and renew with it'
    )


def job_offer(rt: Runtime, job_id: str, gpu: str, cheapest: Offer | None) -> Offer | None:
    """The offer a quote for renewing `job_id` is priced on: the cheapest free one, unless the
    instance the job holds costs more (then its own offer: a renewal is never sold below it)."""
    with rt.store.session() as s:
        held = [
            i
            for i in book.instances_of(s, job_id[:32])
            if i.status in book.HOLDING and i.offer and Offer(**i.offer).gpu == gpu
        ]
    dearest = max(held, key=lambda i: i.price_per_hour, default=None)
    if dearest is None or (
        cheapest is not None and cheapest.price_per_hour >= dearest.price_per_hour
    ):
        return cheapest
    return Offer(**dearest.offer)


def held_offer(rt: Runtime, gpu: str) -> Offer | None:
    """The cheapest offer an instance the gateway holds on `gpu` was launched on, or None: with
    no GPU free (its own jobs may hold them all), a renewal is still priced after a restart,
    when nothing quoted before is remembered."""
    with rt.store.session() as s:
        offers = [Offer(**o) for o in book.held_offers(s)]
    return min(
        (o for o in offers if o.gpu == gpu),
        key=lambda o: (o.price_per_hour, o.region, o.offer_id),
        default=None,
    )


def free_gpus(offers: list[Offer], quote: GatewayQuoteRow) -> int:
    """The GPUs the cloud shows free now for `quote`: one GPU, on demand, at no more than its
    cost (so a dearer tier sharing a region's machines is not counted twice)."""
    return sum(
        o.available
        for o in offers
        if o.gpu == quote.gpu
        and not o.interruptible
        and o.gpu_count == 1
        and o.price_per_hour <= quote.cost_per_hour
    )
