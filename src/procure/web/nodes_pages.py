"""The Nodes page's route: each GPU node's latest figures and its models (procure.web.nodes)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from procure.fleet.settings import FleetSettings
from procure.store import Store
from procure.web.nodes import MODELS_DEADLINE_S, nodes_view


def add_nodes_routes(
    router: APIRouter,
    store: Store,
    *,
    page: Callable[..., Response],
    may_read: Callable[[Request], bool],
    to_login: Callable[[Request], Response],
    fleet_cfg: FleetSettings | None = None,
) -> None:
    cfg = fleet_cfg or FleetSettings()

    @router.get("/nodes", response_class=HTMLResponse)
    async def nodes_page(request: Request) -> Response:
        if not may_read(request):
            return to_login(request)
        nodes = await nodes_view(store, cfg)
        return page(
            request, "nodes.html", {"nodes": nodes, "deadline_s": MODELS_DEADLINE_S, "nav": "nodes"}
        )
