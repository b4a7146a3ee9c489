"""Every offer now, across the configured clouds and x402 vendors, asked through the agent's own
cloud clients (on its loop) and kept briefly, so that a busy page or script cannot spend the
clouds' rate limits: what `GET /api/offers` and the dashboard's Offers page both show.

Lambda and Vast.ai list every GPU count in one answer; RunPod prices and stocks pods of one
count per ask (`RentalCloud.offers`), so it is asked for each of a few counts, and for a count a
caller filters on beyond those. An offer is the tuple (source, offer id, region, GPU count):
RunPod's offer id names a tier and a GPU type, the same for every count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import FastAPI

from procure.agent.cloud_offers import OfferRow, all_offers
from procure.bounds import clip
from procure.clouds.base import RentalCloud
from procure.models import Vendor, utcnow
from procure.store import Store, repo

CACHE_S = 15.0  # one ask of every cloud per this many seconds, whatever the filters or callers
DEADLINE_S = 30.0  # past this a cloud is named as not answering; the others' offers still show
LOOP_SLACK_S = 5.0  # beyond DEADLINE_S, for an agent loop too busy to answer at all
MAX_ERROR_CHARS = 300
MAX_COUNT = 16
MAX_PRICE_USD = 1e4
# Clouds whose offers answer one GPU count per ask (without a count: pods of one GPU).
ONE_COUNT_PER_ASK = frozenset({"runpod"})
# The counts such a cloud is asked for when no count is filtered: the machine sizes clouds sell
# (RunPod's largest pod is 8 GPUs of most types). Four asks, not sixteen, per CACHE_S.
LISTED_COUNTS = (1, 2, 4, 8)
# How long a further count may take: a RunPod client whose pacer waits out a spent rate-limit
# window (up to minutes) is not asked for more counts, and the page does not wait on it.
MORE_COUNTS_S = 5.0


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


def _order(rows: list[OfferRow]) -> list[OfferRow]:
    """Cheapest first; the count decides between rows that differ only by it."""
    return sorted(
        rows, key=lambda r: (r.price_per_hour, r.source, r.region, r.offer_id, r.gpu_count)
    )


def _plural(counts: tuple[int, ...]) -> str:
    return ", ".join(map(str, counts)) + (" GPU" if counts == (1,) else " GPUs")


async def _ask_cloud(
    provider: str,
    client: RentalCloud,
    counts: tuple[int, ...],
    vendors: list[Vendor],
    rows: list[OfferRow],
    errors: list[str],
) -> None:
    """`provider`'s offers into `rows` as they come (kept if the deadline cuts it short). A
    one-count cloud is asked count by count, each further count within MORE_COUNTS_S, and no
    further after its first trouble: a refusal or a rate limit would answer the next count the
    same, and its limits (and its client's pacer) are the agent's too."""
    if provider not in ONE_COUNT_PER_ASK:
        rows += await all_offers({provider: client}, vendors, errors=errors)
        return
    for i, count in enumerate(counts):
        troubles: list[str] = []
        ask = all_offers({provider: client}, vendors, count=count, errors=troubles)
        try:
            rows += await (ask if i == 0 else asyncio.wait_for(ask, MORE_COUNTS_S))
        except TimeoutError:
            troubles.append(
                f"no answer within {MORE_COUNTS_S:g} s (its client may be waiting out a rate limit)"
            )
        if troubles:
            what = troubles[0].removeprefix(f"{provider}: ")
            rest = counts[i + 1 :]
            skipped = f" (pods of {_plural(rest)} not asked)" if rest else ""
            errors.append(f"{provider} (pods of {_plural((count,))}): {what}{skipped}")
            return


async def _ask_all(
    clouds: Mapping[str, RentalCloud], counts: tuple[int, ...], vendors: list[Vendor]
) -> tuple[list[OfferRow], list[str]]:
    """Every cloud at once, each within DEADLINE_S: one slow or failing cloud is named, never
    hides the others."""
    rows: dict[str, list[OfferRow]] = {p: [] for p in clouds}
    errors: dict[str, list[str]] = {p: [] for p in clouds}
    tasks = {
        p: asyncio.ensure_future(_ask_cloud(p, c, counts, vendors, rows[p], errors[p]))
        for p, c in clouds.items()
    }
    late: list[str] = []
    if tasks:
        _done, pending = await asyncio.wait(tasks.values(), timeout=DEADLINE_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # their clients' calls unwound
        late = sorted(p for p, t in tasks.items() if t in pending)
        for p in sorted(tasks):
            if tasks[p] not in pending:
                tasks[p].result()  # a client's bug is not hidden as a cloud's trouble
    said = [e for p in sorted(clouds) for e in errors[p]]
    if late:
        said.append(f"the clouds ({', '.join(late)}) did not answer within {DEADLINE_S:g} s")
    return [r for p in sorted(clouds) for r in rows[p]], said


async def _fetch(app: FastAPI, store: Store, count: int | None) -> Fetched:
    """Every offer (count None), or a one-count cloud's pods of `count` GPUs only."""
    vendors = await asyncio.to_thread(_vendors, store)
    agent = app.state.agent
    every = sorted(agent.deps.clouds)
    clouds = every if count is None else [p for p in every if p in ONE_COUNT_PER_ASK]
    counts = LISTED_COUNTS if count is None else (count,)
    asked_at = utcnow()
    if count is not None and not clouds:
        return Fetched([], [], every, asked_at)
    cloud_vendors = [v for v in vendors if v.kind == "cloud"]
    # The x402 vendors' offers need no cloud, and come with every offer only.
    x402 = await all_offers({}, vendors) if count is None else []

    async def ask(deps: Any) -> Fetched:
        asked = {p: deps.clouds[p] for p in clouds if p in deps.clouds}
        rows, errors = await _ask_all(asked, counts, cloud_vendors)
        said = [clip(e, MAX_ERROR_CHARS) for e in errors]
        return Fetched(_order(rows + x402), said, every, asked_at)

    try:
        return await asyncio.wait_for(agent.call(ask), DEADLINE_S + LOOP_SLACK_S)
    except TimeoutError:
        late = f"the clouds ({', '.join(clouds)}) did not answer within {DEADLINE_S:g} s"
        return Fetched(x402, [late], every, asked_at)


def _cached(
    key: int | None, app: FastAPI, make: Callable[[], Awaitable[Fetched]]
) -> asyncio.Future[Fetched]:
    """The answer kept under `key`, asked anew when it is CACHE_S old or failed."""
    kept: dict[int | None, _Entry] = getattr(app.state, "offers_cache", None) or {}
    app.state.offers_cache = kept
    entry = kept.get(key)
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
        entry = _Entry(now, asyncio.ensure_future(make()))
        kept[key] = entry
    assert entry is not None
    return asyncio.shield(entry.task)  # a caller that leaves does not cancel the others'


async def offers_now(app: FastAPI, store: Store, count: int | None = None) -> Fetched:
    """Every offer, asked at most once per CACHE_S per app; callers meanwhile share the answer
    (and one ask in flight). A failed ask is not kept. With `count` beyond LISTED_COUNTS the
    one-count clouds are asked for pods of that many too (kept per count, as briefly): at most
    MAX_COUNT such asks per CACHE_S."""
    if count is None or count in LISTED_COUNTS:
        return await _cached(None, app, lambda: _fetch(app, store, None))
    every, extra = await asyncio.gather(
        _cached(None, app, lambda: _fetch(app, store, None)),
        _cached(count, app, lambda: _fetch(app, store, count)),
    )
    return Fetched(
        _order(every.rows + extra.rows),
        every.errors + extra.errors,
        every.clouds,
        min(every.asked_at, extra.asked_at),  # the answer is as old as its oldest part
    )


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
