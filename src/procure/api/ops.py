"""The operations routes: `/healthz` (runs by status, and the state of each background task:
one that failed makes the status `degraded`) and Prometheus' `/metrics` (the agent's and the
fleet's), both read from the store in a thread. /healthz is open; /metrics follows the one
scrape rule of `procure.scrape` (PROCURE_METRICS_TOKEN, else the API token, else open)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from procure.agent import metrics
from procure.scrape import ScrapeSettings, scrape_allowed
from procure.settings import Settings
from procure.store import Store, repo


def ops_router(
    store: Store, background: dict[str, str] | None = None, settings: Settings | None = None
) -> APIRouter:
    router = APIRouter(tags=["ops"])
    tasks = background if background is not None else {}

    def counts() -> dict[str, int]:
        with store.session() as s:
            return repo.count_runs_by_status(s)

    @router.get("/healthz")
    async def healthz() -> dict[str, Any]:
        states = dict(tasks)
        failing = any(s.startswith(("failed", "scan failed")) for s in states.values())
        answer: dict[str, Any] = {
            "status": "degraded" if failing else "ok",
            "runs": await asyncio.to_thread(counts),
        }
        if states:
            answer["background"] = states
        return answer

    def scrape() -> bytes:
        # The fleet's collector reads the store inside generate_latest: one thread for both.
        with store.session() as s:
            metrics.observe_store(s)
        return generate_latest(metrics.REGISTRY)

    # /metrics: the scrape token (PROCURE_METRICS_TOKEN) or the API token; open with neither.
    scrape_token = settings.metrics_token if settings else ScrapeSettings().metrics_token
    api_token = settings.api_token if settings else None

    @router.get("/metrics")
    async def prometheus(authorization: str | None = Header(None)) -> Response:
        if not scrape_allowed(authorization, scrape_token, api_token):
            raise HTTPException(401, "missing or wrong bearer token (PROCURE_METRICS_TOKEN)")
        return Response(await asyncio.to_thread(scrape), media_type=CONTENT_TYPE_LATEST)

    return router
