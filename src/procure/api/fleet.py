"""The fleet's routes: the seed's action summary, instances with their figures and anomalies,
the action history, and approve / reject / rollback (bearer token). Store calls run in a thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from procure.agent import metrics
from procure.api.runs import CURSOR, cursor_key, paged
from procure.fleet import actions
from procure.fleet.metrics import FleetCollector
from procure.fleet.settings import FleetSettings
from procure.fleet.summary import action_json, instances, summary
from procure.models import utcnow
from procure.store import Store, keyset
from procure.store.keyset import Key

ACTION_ID = Path(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:-]+$")
_collector = FleetCollector()
metrics.REGISTRY.register(_collector)  # the seed's names on procure's /metrics


def fleet_router(
    store: Store,
    require_token: Callable[..., None],
    cfg: FleetSettings | None = None,
    *,
    require_read: Callable[..., None] | None = None,
) -> APIRouter:
    cfg = cfg or FleetSettings()
    _collector.store = store
    router = APIRouter(prefix="/api/fleet", tags=["fleet"])
    guarded = [Depends(require_token)]
    readers = [Depends(require_read)] if require_read else []

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def read_summary() -> dict[str, Any]:
        with store.session() as s:
            return summary(s, cfg, utcnow())

    def read_instances() -> list[dict[str, Any]]:
        with store.session() as s:
            return instances(s, cfg, utcnow())

    def read_actions(
        status: str | None, limit: int, after: Key | None
    ) -> tuple[list[dict[str, Any]], Key | None]:
        with store.session() as s:
            page = keyset.actions(s, limit=limit, after=after, status=status)
            return [action_json(r) for r in page.rows], page.next

    @router.get("/summary", dependencies=readers)
    async def get_summary() -> dict[str, Any]:
        return await asyncio.to_thread(read_summary)

    @router.get("/instances", dependencies=readers)
    async def get_instances() -> list[dict[str, Any]]:
        return await asyncio.to_thread(read_instances)

    @router.get("/actions", dependencies=readers)
    async def get_actions(
        request: Request,
        status: str | None = Query(None, max_length=50),
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = CURSOR,
    ) -> JSONResponse:
        """The action history newest first; the next page's URL in the `Link` header."""
        after = cursor_key(cursor)
        found, after_next = await asyncio.to_thread(read_actions, status, limit, after)
        return paged(request, found, after_next)

    def decide(action_id: str, approve: bool) -> dict[str, Any]:
        row = actions.decide(
            store,
            action_id,
            approve,
            "api",
            utcnow(),
            slack=cfg.slack_webhook_url is not None,
            fleet_name=cfg.fleet_name,
        )
        return action_json(row)  # inside the thread: the row's attributes are read here

    def roll_back(action_id: str) -> dict[str, Any]:
        return action_json(actions.rollback(store, action_id, "api", utcnow()))

    async def _decide(action_id: str, approve: bool) -> JSONResponse:
        try:
            decided = await asyncio.to_thread(decide, action_id, approve)
        except KeyError:
            return error(404, f"action {action_id} not found")
        except actions.ActionRefused as exc:
            return error(409, str(exc))
        return JSONResponse(decided)

    @router.post("/actions/{action_id}/approve", dependencies=guarded)
    async def approve(action_id: str = ACTION_ID) -> JSONResponse:
        return await _decide(action_id, True)

    @router.post("/actions/{action_id}/reject", dependencies=guarded)
    async def reject(action_id: str = ACTION_ID) -> JSONResponse:
        return await _decide(action_id, False)

    @router.post("/actions/{action_id}/rollback", dependencies=guarded)
    async def rollback(action_id: str = ACTION_ID) -> JSONResponse:
        try:
            rolled = await asyncio.to_thread(roll_back, action_id)
        except KeyError:
            return error(404, f"action {action_id} not found")
        except actions.ActionRefused as exc:
            return error(409, str(exc))
        return JSONResponse(rolled, status_code=202)

    return router
