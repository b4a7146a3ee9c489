"""`GET /api/offers`: every offer across the configured clouds and x402 vendors, cheapest first
(`procure.agent.offers_cache` asks and keeps them)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from procure.agent.offers_cache import (
    MAX_COUNT,
    MAX_PRICE_USD,
    offers_now,
    select,
)
from procure.loopthread import LoopNotRunning
from procure.models import GPU_PATTERN, usd_to_micros
from procure.store import Store

__all__ = ["GPU_PATTERN", "MAX_COUNT", "MAX_PRICE_USD", "offers_now", "offers_router", "select"]

GPU = Query(None, min_length=1, max_length=40, pattern=GPU_PATTERN, description="e.g. A100")
COUNT = Query(None, ge=1, le=MAX_COUNT, description="GPUs per instance")
MAX_PRICE = Query(
    None, alias="maxPrice", ge=0, le=MAX_PRICE_USD, description="At most this $/h (instance)"
)
SPOT = Query(None, description="true: only interruptible offers; false: only on-demand")


def offers_router(store: Store, require_read: Callable[..., None]) -> APIRouter:
    router = APIRouter(tags=["offers"])

    @router.get("/api/offers", dependencies=[Depends(require_read)])
    async def offers(
        request: Request,
        gpu: str | None = GPU,
        count: int | None = COUNT,
        max_price: float | None = MAX_PRICE,
        spot: bool | None = SPOT,
    ) -> JSONResponse:
        """Every offer across the clouds whose key is set and the registered x402 vendors,
        cheapest first: provider (`source`), region, GPU, count, $/h for the instance,
        interruptible or not, availability, and the vendor it would be bought through. A cloud
        that cannot be asked is named in `errors`, never fatal. Answers may be up to 15 s old
        (`askedAt`). RunPod, which prices one GPU count per ask, is listed for pods of 1, 2, 4
        and 8 GPUs, and of `count` when another is asked for."""
        try:
            found = await offers_now(request.app, store, count)
        except LoopNotRunning:
            return JSONResponse({"error": "the agent is not running"}, status_code=503)
        rows = select(
            found.rows,
            gpu=gpu,
            count=count,
            max_price=usd_to_micros(max_price) if max_price is not None else None,
            spot=spot,
        )
        return JSONResponse(
            {
                "offers": [r.to_json() for r in rows],
                "errors": found.errors,
                "clouds": found.clouds,
                "askedAt": found.asked_at.isoformat(),
            }
        )

    return router
