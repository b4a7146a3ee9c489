"""The nodes resource: `GET /api/nodes`, each live GPU node's latest figures and its models (the
same data as the dashboard's Nodes page)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends

from procure.fleet.settings import FleetSettings
from procure.store import Store
from procure.web.nodes import nodes_view


def nodes_router(
    store: Store, require_read: Callable[..., None], cfg: FleetSettings | None = None
) -> APIRouter:
    cfg = cfg or FleetSettings()
    router = APIRouter(tags=["nodes"])

    @router.get("/api/nodes", dependencies=[Depends(require_read)])
    async def nodes() -> list[dict[str, Any]]:
        """Figures from the fleet's latest sample of each node; models asked of the node now
        (`models.state`: ok, degraded, not_configured, error, or skipped when unreachable)."""
        return await nodes_view(store, cfg)

    return router
