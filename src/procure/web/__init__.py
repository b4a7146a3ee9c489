"""The operator's dashboard: server-rendered pages over the API's services, mounted by
`mount_dashboard` into the API app (`procure serve` serves it at `/`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from procure.settings import Settings
from procure.store import Store
from procure.web.auth import make_auth
from procure.web.pages import web_router
from procure.web.settings import WebSettings
from procure.web.templating import STATIC_DIR

if TYPE_CHECKING:
    from procure.fleet.settings import FleetSettings


def _fleet_available() -> bool:
    """The fleet page only when the fleet modules are there and import cleanly."""
    try:
        importlib.import_module("procure.web.fleet")
    except ImportError:  # the fleet controller is not part of this build
        return False
    return True


def mount_dashboard(
    app: FastAPI,
    settings: Settings,
    store: Store,
    web: WebSettings | None = None,
    *,
    fleet_cfg: FleetSettings | None = None,
) -> None:
    """The pages at `/`; `fleet_cfg`: what the Fleet and Nodes pages read with (the in-server
    controller's settings; default: the environment's)."""
    auth = make_auth(settings, web or WebSettings())
    app.state.dashboard_auth = auth  # one session store: /offers logs out too
    if not auth.open:  # logouts outlive a restart, and count on every server over the store
        auth.keep_logouts_in(store)
    app.include_router(
        web_router(settings, store, auth, fleet=_fleet_available(), fleet_cfg=fleet_cfg)
    )
    app.mount("/assets", StaticFiles(directory=STATIC_DIR), name="dashboard-assets")
