"""Every offer now, across the configured clouds and x402 vendors, asked through the agent's own
cloud clients (on its loop) and kept briefly, so that a busy page or script cannot spend the
clouds' rate limits: what `GET /api/offers` and the dashboard's Offers page both show."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import FastAPI

from procure.agent.cloud_offers import OfferRow, all_offers
from procure.bounds import clip
from procure.models import Vendor, utcnow
from procure.store import Store, repo

CACHE_S = 15.0  # one ask of every cloud per this many seconds, whatever the filters or callers
DEADLINE_S = 30.0  # past this the clouds are named as not answering; the x402 offers still show
MAX_ERROR_CHARS = 300
MAX_COUNT = 16
MAX_PRICE_USD = 1e4


@dataclass(frozen=True)
class Fetched:
    """Every offer now (unfiltered), the clouds' troubles, the clouds asked, and when."""

    rows: list[OfferRow]
    errors: list[str]
    clouds: list[str]
    asked_at: datetime


@dataclass(frozen=True)
class _Entry:
    started: float
    task: asyncio.Future[Fetched]


def _vendors(store: Store) -> list[Vendor]:
    with store.session() as s:
        return repo.list_vendors(s)


async def _fetch(app: FastAPI, store: Store) -> Fetched:
    vendors = await asyncio.to_thread(_vendors, store)
    agent = app.state.agent
    clouds = sorted(agent.deps.clouds)
    asked_at = utcnow()

    async def ask(deps: Any) -> Fetched:
        errors: list[str] = []
        rows = await all_offers(deps, vendors, errors=errors)
        return Fetched(rows, [clip(e, MAX_ERROR_CHARS) for e in errors], clouds, asked_at)

    try:
        return await asyncio.wait_for(agent.call(ask), DEADLINE_S)
    except TimeoutError:
        rows = await all_offers({}, vendors)  # the x402 vendors' offers need no cloud
        late = f"the clouds ({', '.join(clouds)}) did not answer within {DEADLINE_S:g} s"
        return Fetched(rows, [late], clouds, asked_at)


async def offers_now(app: FastAPI, store: Store) -> Fetched:
    """Every offer, asked at most once per CACHE_S per app; callers meanwhile share the answer
    (and one ask in flight). A failed ask is not kept."""
    entry: _Entry | None = getattr(app.state, "offers_cache", None)
    now = time.monotonic()
    stale = entry is None or (
        entry.task.done()
        and (
            entry.task.cancelled()
            or entry.task.exception() is not None
            or now - entry.started >= CACHE_S
        )
    )
    if stale:
        entry = _Entry(now, asyncio.ensure_future(_fetch(app, store)))
        app.state.offers_cache = entry
    assert entry is not None
    return await asyncio.shield(entry.task)  # a caller that leaves does not cancel the others'


def select(
    rows: list[OfferRow],
    *,
    gpu: str | None = None,
    count: int | None = None,
    max_price: int | None = None,
    spot: bool | None = None,
) -> list[OfferRow]:
    """The rows that pass the filters (as `all_offers` applies them; `max_price` in micro-USD),
    still cheapest first."""
    return [
        r
        for r in rows
        if (gpu is None or r.gpu.upper() == gpu.upper())
        and (count is None or r.gpu_count == count)
        and (max_price is None or r.price_per_hour <= max_price)
        and (spot is None or r.interruptible == spot)
    ]
