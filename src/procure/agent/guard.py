"""The guard every planner action passes before anything is quoted or paid."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, timedelta

from procure.agent.context import PlanContext
from procure.agent.planner import plan_cost_aware
from procure.agent.slices import MIN_SLICE_HOURS, job_hours, next_slice_hours, paid_hours
from procure.agent.start_request import MIN_CHECKPOINT_EVERY
from procure.models import Action, Job, PaymentStatus, Quote, Vendor, format_usd, utcnow

EPS = 1e-9
MAX_HOURS = 1e6  # no job is longer; a larger figure (or inf) is not a plan


def estimated_cost(ctx: PlanContext, action: Action) -> int:
    vendor = ctx.vendor(action.vendor_id)
    hours = action.hours or ctx.state.run.job_spec.hours
    return round(vendor.base_price_per_hour * hours) if vendor else 0


def check_action(ctx: PlanContext, action: Action) -> str | None:
    """Why `action` must not be carried out, or None if it may."""
    if action.action != "start_job":
        return None
    vendor = ctx.vendor(action.vendor_id)
    if vendor is None:
        return f"unknown vendor {action.vendor_id!r}"
    gpu = action.gpu_type or ctx.state.run.job_spec.gpu_type
    if gpu not in vendor.supported_gpu_types:
        return f"{vendor.vendor_id} does not offer GPU type {gpu}"
    # The job is quoted and run on its spec's GPU type whatever the action names: a planner (an
    # LLM) naming another must not get a vendor hired that lacks the job's.
    wanted = ctx.state.run.job_spec.gpu_type
    if gpu != wanted:
        return f"the job runs on {wanted}, not {gpu}"
    # A planner's numbers come from outside too (an LLM): finite and bounded (a cost must be
    # computable), and no slice under a minute (a payment per millisecond would be carried out).
    if action.hours is not None and not 0 < action.hours <= MAX_HOURS:
        return f"hours must be above 0 and at most {MAX_HOURS:g}, got {action.hours}"
    # The finest slice a planner may buy: a minute, or for a short job a quarter of its finest
    # checkpoint interval (what the heuristic's cost model may choose), never less.
    finest = min(MIN_SLICE_HOURS, ctx.state.run.job_spec.hours * MIN_CHECKPOINT_EVERY / 4)
    if action.slice_hours is not None and not finest - EPS <= action.slice_hours <= MAX_HOURS:
        return f"slice hours must be from {finest:g} to {MAX_HOURS:g}, got {action.slice_hours}"
    if ctx.cooling_down(vendor):
        return f"{vendor.vendor_id} is cooling down after a failure until {vendor.cooldown_until}"
    cost = estimated_cost(ctx, action)
    if cost > ctx.available:
        return (
            f"{vendor.vendor_id} would cost {format_usd(cost)}, "
            f"over the {format_usd(ctx.available)} left"
        )
    return None


def check_quote(ctx: PlanContext, action: Action, quote: Quote) -> str | None:
    """Why a vendor's quote must not be paid, or None if it may."""
    if quote.vendor_id != action.vendor_id:
        return f"quote is from {quote.vendor_id}, not {action.vendor_id}"
    if quote.amount <= 0:
        return f"quote amount {format_usd(quote.amount)} is not positive"
    terms = check_quote_terms(quote, ctx.state.run.job_spec.gpu_type, ctx.payment_overhead)
    if terms is not None:
        return terms
    listed = check_listed_price(ctx, ctx.vendor(action.vendor_id), quote)
    if listed is not None:
        return listed
    if quote.amount > ctx.available:
        return (
            f"quote {format_usd(quote.amount)} from {quote.vendor_id} is over "
            f"the {format_usd(ctx.available)} left"
        )
    return None


LISTED_PRICE_RISE = 0.10
"""How much dearer per hour than its registered price a vendor's first quote for a job may be
and still be paid as chosen: every planner chose it by that price, so a vendor listed at $1/h
quoting $10/h would otherwise be paid up to the budget. Renewals are held to RENEWAL_PRICE_RISE
over the job's earlier slices instead."""


def over_listed(vendor: Vendor | None, quote: Quote) -> bool:
    """Whether `quote` is more than LISTED_PRICE_RISE dearer per hour than `vendor`'s listing."""
    # The quoted price, not the amount per hour: the amount carries a payment's fee (a short
    # slice's reads as a rise) and is held to hours x price plus that fee by check_quote_terms.
    listed = vendor.base_price_per_hour if vendor else quote.price_per_hour
    return quote.price_per_hour > listed * (1 + LISTED_PRICE_RISE) + 1


def check_listed_price(ctx: PlanContext, vendor: Vendor | None, quote: Quote) -> str | None:
    """Why a first quote dearer than the price `vendor` was chosen at must not be paid, or None.
    The registry is the only price procure knows for an x402 vendor (the offers cache lists it
    at that price too), and a listing may lag: a gateway's follows its cloud's live price. So a
    dearer quote is judged as if it were the listing: paid when the cost-aware planner would
    still choose the vendor at that price (no cheaper way, and within the budget), refused when
    it would choose otherwise."""
    if vendor is None or not over_listed(vendor, quote):
        return None
    at_quote = vendor.model_copy(update={"base_price_per_hour": quote.price_per_hour})
    vendors = [at_quote if v.vendor_id == vendor.vendor_id else v for v in ctx.vendors]
    choice = plan_cost_aware(replace(ctx, vendors=vendors, notes=[]))
    if choice.action == "start_job" and choice.vendor_id == vendor.vendor_id:
        return None
    instead = (
        f"{choice.vendor_id} instead" if choice.action == "start_job" else f"to {choice.action}"
    )
    return (
        f"{quote.vendor_id} quotes {format_usd(quote.price_per_hour)}/h, more than "
        f"{LISTED_PRICE_RISE:.0%} over the {format_usd(vendor.base_price_per_hour)}/h it is "
        f"registered at (the price it was chosen by); at its quote the planner chooses {instead}: "
        "not paid (if that is its price now, update its registration: "
        f"PUT /api/vendors/{quote.vendor_id})"
    )


QUOTE_CURRENCY = "USD"
QUOTE_CLOCK_SKEW_S = 900.0
"""How far behind ours a vendor's clock may be before a quote it says has expired is refused."""
"""The only currency a quote's figures may be in: amounts are paid in the registered USD asset."""


def check_quote_terms(quote: Quote, gpu_type: str, fee: int) -> str | None:
    """Why a quote's own terms do not sell what is asked for: another GPU type than the job's,
    another currency, an amount over its own hours at its own price per hour plus `fee` (what
    the planner counts per payment; fewer hours at the full price), or already expired. None
    when they do."""
    # A vendor may spell the type in another case (the gateway matches it so); no other type.
    if quote.gpu_type.upper() != gpu_type.upper():
        return f"{quote.vendor_id} quotes GPU type {quote.gpu_type}, not the job's {gpu_type}"
    if quote.currency.upper() != QUOTE_CURRENCY:
        return f"{quote.vendor_id} quotes in {quote.currency}, not {QUOTE_CURRENCY}"
    # Rounding to the micro-dollar (half up, at least one) and a payment's fee aside, the amount
    # is hours x price: more pays beyond the vendor's own price (later slices measured by it).
    priced = quote.price_per_hour * quote.hours
    if quote.amount > priced * (1 + 1e-6) + 1 + fee:
        return (
            f"{quote.vendor_id} asks {format_usd(quote.amount)} for {quote.hours:g}h at "
            f"{format_usd(quote.price_per_hour)}/h, more than the {format_usd(round(priced))} "
            "those hours cost at its own price"
        )
    expires = quote.expires_at
    if expires is not None:
        # A naive time is read as UTC (comparing it with an aware one would raise).
        expires = (expires if expires.tzinfo else expires.replace(tzinfo=UTC)).astimezone(UTC)
        # Stamped by the vendor's clock: one a few minutes behind ours must not lose every sale.
        if expires + timedelta(seconds=QUOTE_CLOCK_SKEW_S) <= utcnow():
            return f"{quote.vendor_id}'s quote expired at {expires:%Y-%m-%d %H:%M:%S} UTC"
    return None


def check_quote_hours(
    quote: Quote, asked: float, job_hours: float, sliced: bool, fee: int = 0
) -> str | None:
    """Why a job's first payment must not buy `quote.hours` (asked for `asked` of a job of
    `job_hours`), or None. A vendor may sell more than asked (its minimum), never more than the
    whole job needs: those hours would be paid for and never run. A job paid at once (not
    `sliced`) must get all it asked for: nothing would buy the rest. A sliced job may get fewer
    hours, but not with a whole payment's `fee` on them (as `_repriced` holds renewals): seconds
    sold for a fee, job after job, would spend the budget on fees."""
    if quote.hours > job_hours + EPS:
        return (
            f"{quote.vendor_id} sells {quote.hours:g}h, more than the {job_hours:g}h the job needs"
        )
    if not sliced and quote.hours < asked - EPS:
        return f"{quote.vendor_id} sells only {quote.hours:g}h of the {asked:g}h asked for"
    if quote.hours < asked - EPS:
        share = fee * quote.hours / asked  # the fee on the hours sold, as on the hours asked
        priced = quote.price_per_hour * quote.hours
        if quote.amount > priced * (1 + 1e-6) + 1 + share:
            return (
                f"{quote.vendor_id} sells only {quote.hours:g}h of the {asked:g}h asked for, "
                f"for {format_usd(quote.amount)}: a whole payment's fee on a sliver"
            )
    return None


def check_renewal_hours(quote: Quote, left: float, sold_before: float | None) -> str | None:
    """Why the next slice must not buy `quote.hours` when the job still needs `left` hours,
    or None. Hours beyond the job are paid for and never run: allowed only up to the least this
    vendor already sold this job (`sold_before`), which is then a minimum it forces on
    every payment; a vendor selling more than that is refused (the job runs out its paid time,
    and the run moves on)."""
    if quote.hours <= left + EPS:
        return None
    if sold_before is not None and quote.hours <= sold_before + EPS:
        return None
    return (
        f"{quote.vendor_id} sells {quote.hours:g}h, more than the {left:g}h the job still "
        "needs" + (f" and more than its {sold_before:g}h minimum so far" if sold_before else "")
    )


def check_renewal(ctx: PlanContext, job: Job, quote: Quote) -> str | None:
    """Why the next slice of a running job must not be paid, or None if it may."""
    if quote.vendor_id != job.vendor_id:
        return f"quote is from {quote.vendor_id}, not {job.vendor_id}"
    if quote.amount <= 0:
        return f"quote amount {format_usd(quote.amount)} is not positive"
    terms = check_quote_terms(quote, ctx.state.run.job_spec.gpu_type, ctx.payment_overhead)
    if terms is not None:
        return terms
    if quote.amount > ctx.available:
        return (
            f"the next slice, {format_usd(quote.amount)} from {quote.vendor_id}, is over "
            f"the {format_usd(ctx.available)} left"
        )
    return _repriced(ctx, job, quote)


RENEWAL_PRICE_RISE = 0.10
"""How much dearer per hour than the job's earlier slices a renewal may be and still be paid
without the planner: a renewal is bought on its own, so a vendor raising its price mid-job would
otherwise be paid at any price the budget holds."""


def _repriced(ctx: PlanContext, job: Job, quote: Quote) -> str | None:
    # What each slice cost per hour, its payment's fee aside: a first payment sold as a sliver
    # (seconds, for its price plus a whole fee) would otherwise set a baseline many times the
    # vendor's price, and every later sliver at the same fee would pass as no rise at all.
    paid = [
        max(0.0, p.amount - ctx.payment_overhead) / p.hours
        for p in ctx.state.payments
        if p.job_id == job.id and p.status == PaymentStatus.completed and p.hours
    ]
    if not paid or quote.hours <= 0:
        return None
    # Against what the job was bought at per hour as well as what its slices cost: a vendor that
    # signs for less than it quotes would otherwise look, at its next quote, like one that
    # raised its price, and no renewal would ever be bought.
    hours = job_hours(job)
    quoted = job.expected_cost / hours if job.expected_cost and hours > 0 else 0.0
    # Its price per hour, not its amount per hour: a short slice (a run's last checkpoint
    # interval is often a few minutes) carries its payment's fee on those minutes, which read as
    # a price rise and stopped the job for a restart a sliver from its end. The amount is held
    # to hours x price plus that fee by `check_quote_terms`.
    # But the fee is allowed on the hours asked for, not on fewer: a vendor selling a sliver of
    # the slice asked for (seconds) at its price plus a whole fee costs many times its price per
    # hour, renewal after renewal, and its quoted price would not show it.
    asked = next_slice_hours(job, paid_hours(job, ctx.state.payments))
    fee_per_hour = ctx.payment_overhead / max(quote.hours, asked)
    cost = quote.amount / quote.hours - fee_per_hour
    before, now = max(min(paid), quoted), max(float(quote.price_per_hour), cost)
    if now <= before * (1 + RENEWAL_PRICE_RISE) + 1:
        return None
    return (
        f"{quote.vendor_id} raised its price from {format_usd(round(before))}/h to "
        f"{format_usd(round(now))}/h: the job runs out its paid time and the run chooses again"
    )
