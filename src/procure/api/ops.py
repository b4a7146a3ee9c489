"""The operations routes: `/healthz` (runs by status) and Prometheus' `/metrics` (the agent's
and the fleet's), both read from the store in a thread."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from procure.api import metrics
from procure.store import Store, repo


def ops_router(store: Store) -> APIRouter:
    router = APIRouter(tags=["ops"])

    def counts() -> dict[str, int]:
        with store.session() as s:
            return repo.count_runs_by_status(s)

    @router.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "runs": await asyncio.to_thread(counts)}

    def scrape() -> bytes:
        # The fleet's collector reads the store inside generate_latest: one thread for both.
        with store.session() as s:
            metrics.observe_store(s)
        return generate_latest(metrics.REGISTRY)

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(await asyncio.to_thread(scrape), media_type=CONTENT_TYPE_LATEST)

    return router
