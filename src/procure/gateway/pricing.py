"""What the gateway charges: the cloud's live offer for the GPU plus the margin, per hour, and
what an instance has cost it (the provider's bill, or its price by billing increment)."""

from __future__ import annotations

import math
from datetime import datetime

from procure.clouds.base import Offer


def sell_per_hour(cost_per_hour: int, margin: float) -> int:
    """Micro-USD per hour to the buyer: the offer's price plus the margin, rounded up."""
    return math.ceil(cost_per_hour * (1.0 + margin) - 1e-6)


def amount_for(price_per_hour: int, hours: float) -> int:
    """Micro-USD for `hours` at `price_per_hour` (half-up, as the mock vendor prices)."""
    return max(1, math.floor(price_per_hour * hours + 0.5))


def sold_hours(hours: float, increment_s: int, min_sale_s: float = 0.0) -> float:
    """Hours a quote for `hours` sells on an offer billed by `increment_s`: at least one
    increment, since the instance it launches costs that much however soon it stops, and at
    least `min_sale_s` (the boot, billed by some clouds but not sold, is paid from the margin)."""
    return max(hours, max(1, increment_s, min_sale_s) / 3600)


def best_offer(offers: list[Offer], gpu: str, skip_regions: set[str] | None = None) -> Offer | None:
    """The cheapest on-demand single-GPU offer of `gpu` that can be launched now, outside
    `skip_regions` (a paid job never lands on an interruptible offer: it would be lost). An
    offer listed at $0 (under a micro-dollar) is none: its price is unknown, not nothing, and
    as the cheapest it was quoted at a micro-dollar for a day and launched on as costing none."""
    fit = [
        o
        for o in offers
        if o.gpu == gpu.upper()
        and not o.interruptible
        and o.available > 0
        and o.gpu_count == 1
        and o.price_per_hour > 0
        and o.region not in (skip_regions or set())
    ]
    return min(fit, key=lambda o: (o.price_per_hour, o.region, o.offer_id), default=None)


def instance_cost(
    price_per_hour: int, increment_s: int, start: datetime | None, end: datetime
) -> int:
    """What an instance costs from `start` to `end` at the provider's billing increment."""
    if start is None:
        return 0
    seconds = max(0.0, (end - start).total_seconds())
    step = max(1, increment_s)
    billed_s = math.ceil(seconds / step - 1e-9) * step
    return math.ceil(price_per_hour * billed_s / 3600 - 1e-9)
