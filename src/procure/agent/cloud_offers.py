"""Cloud offers for the agent: each cloud vendor is weighed at its best offer now (price, learned
reliability per provider/region/GPU, preemption hazard of interruptible offers, boot time), with
the planner's own expected-cost arithmetic; and `all_offers`, every offer across the configured
clouds and x402 vendors, cheapest first (`procure offers`, `GET /api/offers`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from procure.agent.context import PRIOR_HOURS, PlanContext
from procure.agent.planner import choices
from procure.clouds.base import CloudError, Offer, RentalCloud
from procure.models import ObservationType as OBS
from procure.models import OfferTerms, Vendor, format_usd, micros_to_usd, utcnow
from procure.store import cloud_repo, repo
from procure.store.cloud_repo import OfferStats

if TYPE_CHECKING:
    # Not at run time: the agent's dependencies pull in the wallet's libraries, which the API's
    # schemas (and so every CLI command) would then load.
    from procure.agent.deps import AgentDeps

RETRY_OFFERS_S = 60.0  # a cloud whose offers cannot be read now is asked again after this
KEY_ENV = {"lambda": "LAMBDA_API_KEY", "runpod": "RUNPOD_API_KEY", "vast": "VAST_API_KEY"}


def matches(vendor: Vendor, offer: Offer) -> bool:
    """Whether a cloud vendor's terms accept `offer`."""
    terms = vendor.cloud
    if terms is None or offer.provider != terms.provider:
        return False
    return (
        priced_right(offer)
        and offer.gpu.upper() == terms.gpu.upper()
        and offer.gpu_count == terms.count
        and offer.price_per_hour <= terms.max_price_per_hour
        and (terms.spot or not offer.interruptible)
        and (not terms.regions or offer.region in terms.regions)
        and offer.available > 0
    )


def priced_right(offer: Offer) -> bool:
    """Whether `offer` has a price procure can reserve against: above zero (and a number). At
    $0/h (a provider's free promotion, a parse gone wrong) nothing would be reserved and no
    budget would ever stop the instance, while the provider may bill it all the same."""
    return 0 < offer.price_per_hour < math.inf


def offer_terms(deps: AgentDeps, offer: Offer, stats: OfferStats) -> OfferTerms:
    """What renting `offer` costs and risks, from its price and what was learned of its kind."""
    prior_boot = deps.cloud.boot_s.get(offer.provider, 300.0)
    boot = (prior_boot + stats.boot_seconds) / (1 + stats.boots)
    prior = deps.cloud.spot_hazard if offer.interruptible else 0.0
    preemption = (prior * PRIOR_HOURS + stats.preemptions) / (PRIOR_HOURS + stats.gpu_hours)
    return OfferTerms(
        provider=offer.provider,
        offer_id=offer.offer_id,
        gpu=offer.gpu,
        gpu_count=offer.gpu_count,
        region=offer.region,
        price_per_hour=offer.price_per_hour,
        interruptible=offer.interruptible,
        billing_increment_s=offer.billing_increment_s,
        boot_s=boot,
        preemption_hazard=preemption,
        min_bid_per_hour=offer.min_bid_per_hour,
    )


def as_offer(terms: OfferTerms) -> Offer:
    return Offer(
        provider=terms.provider,  # type: ignore[arg-type]
        offer_id=terms.offer_id,
        gpu=terms.gpu,
        gpu_count=terms.gpu_count,
        region=terms.region,
        price_per_hour=terms.price_per_hour,
        interruptible=terms.interruptible,
        available=1,
        billing_increment_s=terms.billing_increment_s,
        min_bid_per_hour=terms.min_bid_per_hour,
    )


def describe_offer(terms: OfferTerms) -> str:
    kind = "bid" if terms.interruptible else "on-demand"
    return (
        f"{terms.provider}/{kind} {terms.gpu}x{terms.gpu_count} in {terms.region} "
        f"{format_usd(terms.price_per_hour)}/h, boot ~{terms.boot_s:.0f}s"
    )


async def _fetch(
    clients: Mapping[str, RentalCloud],
    provider: str,
    gpu: str | None,
    count: int,
    cache: dict[Any, Any],
) -> list[Offer] | str:
    """The provider's offers of `gpu` x `count`, once per call site's `cache`; an error's text
    on failure."""
    key = (provider, gpu, count)
    if key not in cache:
        client = clients.get(provider)
        if client is None:
            cache[key] = f"no {provider} account configured ({KEY_ENV.get(provider, 'its key')})"
        else:
            try:
                cache[key] = list(await client.offers(gpu=gpu, gpu_count=count))
            except CloudError as exc:
                cache[key] = f"{provider} offers: {exc}"
    return cache[key]  # type: ignore[no-any-return]


async def price_clouds(deps: AgentDeps, ctx: PlanContext) -> PlanContext:
    """`ctx` with each cloud vendor replaced by a copy priced at its best offer now (its
    `offer`, `base_price_per_hour`, and the learned counts of that offer's kind), ranked by the
    planner's own `choices`. A vendor whose cloud has no key is left out; one whose offers
    cannot be read, or has none within its terms now, waits (cooled for a minute)."""
    if not any(v.kind == "cloud" for v in ctx.vendors):
        return ctx
    now = utcnow()
    cache: dict[Any, Any] = {}
    stats: dict[str, dict[tuple[str, str], OfferStats]] = {}
    vendors: list[Vendor] = []
    said: list[tuple[Any, str]] = []
    for vendor in ctx.vendors:
        terms = vendor.cloud
        if vendor.kind != "cloud" or terms is None:
            vendors.append(vendor)
            continue
        fetched = await _fetch(deps.clouds, terms.provider, terms.gpu, terms.count, cache)
        if isinstance(fetched, str):
            said.append((OBS.agent_reasoning, f"{vendor.vendor_id}: {fetched}"))
            if terms.provider in deps.clouds:
                vendors.append(_waiting(vendor, now))
            continue
        if terms.provider not in stats:
            with deps.store.session() as s:
                stats[terms.provider] = cloud_repo.offer_stats(s, terms.provider)
        known = stats[terms.provider]
        copies = []
        cooling = 0
        free = [o for o in fetched if not priced_right(o) and matches(vendor, _priced_at(o, 1))]
        if free:
            said.append((OBS.error, _unpriced(vendor, free)))
        for i, offer in enumerate(o for o in fetched if matches(vendor, o)):
            learned = known.get((offer.region, offer.gpu), OfferStats())
            if learned.cooldown_until is not None and learned.cooldown_until > now:
                cooling += 1
                continue
            copies.append(priced(deps, vendor, offer, learned, f"{vendor.vendor_id}#{i}"))
        if not copies:
            why = f"{cooling} cooling down after trouble" if cooling else "none now"
            said.append(
                (
                    OBS.agent_reasoning,
                    f"{vendor.vendor_id}: no {terms.gpu}x{terms.count} offer within "
                    f"{format_usd(terms.max_price_per_hour)}/h ({why})",
                )
            )
            vendors.append(_waiting(vendor, now))
            continue
        ranked = choices(ctx, copies)
        best = ranked[0].vendor if ranked else min(copies, key=lambda v: v.base_price_per_hour)
        vendors.append(best.model_copy(update={"vendor_id": vendor.vendor_id}))
    if said:  # a run waiting tick after tick for offers says so once
        with deps.store.session() as s:
            recent = set(repo.recent_contents(s, ctx.state.run.id, limit=12))
        ctx.notes.extend(note for note in said if note[1] not in recent)
    return replace(ctx, vendors=vendors)


def priced(
    deps: AgentDeps, vendor: Vendor, offer: Offer, learned: OfferStats, ranking_id: str
) -> Vendor:
    return vendor.model_copy(
        update={
            "vendor_id": ranking_id,
            "base_price_per_hour": offer.price_per_hour,
            "supported_gpu_types": [vendor.cloud.gpu] if vendor.cloud else [],
            "successes": learned.successes,
            "failures": learned.failures,
            "gpu_hours": learned.gpu_hours,
            "offer": offer_terms(deps, offer, learned),
        }
    )


def _priced_at(offer: Offer, micros: int) -> Offer:
    return replace(offer, price_per_hour=micros)


def _unpriced(vendor: Vendor, offers: list[Offer]) -> str:
    """Why offers that would otherwise match `vendor` were refused, said once in the run's log."""
    shown = ", ".join(
        f"{o.offer_id} in {o.region} at ${o.price_per_hour / 1_000_000:g}/h" for o in offers[:3]
    ) + (f" and {len(offers) - 3} more" if len(offers) > 3 else "")
    return (
        f"{vendor.vendor_id}: refused {len(offers)} {offers[0].provider} offer(s) priced at zero "
        f"or less ({shown}): nothing can be reserved against such a price, so no budget would "
        "stop the instance while the provider may bill it"
    )


def _waiting(vendor: Vendor, now: Any) -> Vendor:
    until = now + timedelta(seconds=RETRY_OFFERS_S)
    if vendor.cooldown_until is not None and vendor.cooldown_until > until:
        until = vendor.cooldown_until
    return vendor.model_copy(update={"cooldown_until": until})


# --- every offer, for people -------------------------------------------------------------


@dataclass(frozen=True)
class OfferRow:
    """One offer across every source: a cloud's (`source` its provider) or an x402 vendor's
    (`source` "x402", on demand at its base price)."""

    source: str
    vendor_id: str | None  # the registered vendor it would be bought through, if any
    offer_id: str
    gpu: str
    gpu_count: int
    region: str
    price_per_hour: int  # micro-USD, the whole instance
    interruptible: bool
    available: int
    billing_increment_s: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "vendorId": self.vendor_id,
            "offerId": self.offer_id,
            "gpu": self.gpu,
            "gpuCount": self.gpu_count,
            "region": self.region,
            "pricePerHour": micros_to_usd(self.price_per_hour),
            "interruptible": self.interruptible,
            "available": self.available,
            "billingIncrementS": self.billing_increment_s,
        }


async def all_offers(
    clients: AgentDeps | Mapping[str, RentalCloud],
    vendors: list[Vendor],
    *,
    gpu: str | None = None,
    count: int | None = None,
    max_price: int | None = None,
    spot: bool | None = None,
    errors: list[str] | None = None,
) -> list[OfferRow]:
    """Every offer over the configured clouds and the x402 vendors, cheapest first. `max_price`
    in micro-USD per hour; `spot`: True only interruptible, False only on-demand, None both.
    A cloud that cannot be asked is left out and its trouble appended to `errors`."""
    mapping = clients if isinstance(clients, Mapping) else clients.clouds
    rows: list[OfferRow] = []
    cloud_vendors = [v for v in vendors if v.kind == "cloud"]
    for provider, client in sorted(mapping.items()):
        try:
            offers = await client.offers(gpu=gpu, gpu_count=count)
        except CloudError as exc:
            if errors is not None:
                errors.append(f"{provider}: {exc}")
            continue
        for o in offers:
            through = next((v.vendor_id for v in cloud_vendors if matches(v, o)), None)
            rows.append(
                OfferRow(
                    source=provider,
                    vendor_id=through,
                    offer_id=o.offer_id,
                    gpu=o.gpu,
                    gpu_count=o.gpu_count,
                    region=o.region,
                    price_per_hour=o.price_per_hour,
                    interruptible=o.interruptible,
                    available=o.available,
                    billing_increment_s=o.billing_increment_s,
                )
            )
    for v in vendors:
        if v.kind == "cloud":
            continue
        for gpu_type in v.supported_gpu_types:
            rows.append(
                OfferRow(
                    source="x402",
                    vendor_id=v.vendor_id,
                    offer_id=v.vendor_id,
                    gpu=gpu_type,
                    gpu_count=1,
                    region=v.endpoint,
                    price_per_hour=v.base_price_per_hour,
                    interruptible=False,
                    available=1,
                    billing_increment_s=None,
                )
            )
    wanted = [
        r
        for r in rows
        if (gpu is None or r.gpu.upper() == gpu.upper())
        and (count is None or r.gpu_count == count)
        and (max_price is None or r.price_per_hour <= max_price)
        and (spot is None or r.interruptible == spot)
    ]
    return sorted(wanted, key=lambda r: (r.price_per_hour, r.source, r.region, r.offer_id))
