"""The Offers page: every offer across the configured clouds and x402 vendors, cheapest first,
with the filters as a GET form; it shares `GET /api/offers`'s brief cache (procure.api.offers)."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from procure.agent.offers_cache import MAX_COUNT, MAX_PRICE_USD, offers_now, select
from procure.loopthread import LoopNotRunning
from procure.models import GPU_PATTERN, usd_to_micros
from procure.settings import Settings
from procure.store import Store
from procure.web.auth import Auth, make_auth, may_act, may_read, session_of
from procure.web.settings import WebSettings
from procure.web.templating import templates

SPOT_CHOICES = {"": None, "true": True, "false": False}


def _filters(
    gpu: str | None, count: str | None, max_price: str | None, spot: str | None
) -> tuple[dict[str, Any], list[str]]:
    """The form's values as filters, and what is wrong with them (a blank field: no filter)."""
    found: dict[str, Any] = {"gpu": None, "count": None, "max_price": None, "spot": None}
    wrong: list[str] = []
    gpu, count, max_price = (v.strip() if v else "" for v in (gpu, count, max_price))
    if gpu:
        if re.fullmatch(GPU_PATTERN, gpu):
            found["gpu"] = gpu
        else:
            wrong.append("GPU: letters, digits, spaces, dots, dashes and underscores only")
    if count:
        if count.isdecimal() and 1 <= int(count) <= MAX_COUNT:
            found["count"] = int(count)
        else:
            wrong.append(f"GPUs per instance: a whole number from 1 to {MAX_COUNT}")
    if max_price:
        try:
            price = float(max_price)
        except ValueError:
            price = math.nan
        if 0 <= price <= MAX_PRICE_USD:
            found["max_price"] = usd_to_micros(price)
        else:
            wrong.append(f"Max $/h: a number from 0 to {MAX_PRICE_USD:,.0f}")
    if (spot or "") in SPOT_CHOICES:
        found["spot"] = SPOT_CHOICES[spot or ""]
    else:
        wrong.append("Kind: any, interruptible or on-demand")
    return found, wrong


def offers_pages(settings: Settings, store: Store) -> APIRouter:
    """`/offers`. It checks reads as the other pages do: with the dashboard's own Auth when the
    app keeps it in `app.state.dashboard_auth`, else one made from the same settings (sessions
    are signed with a key derived from the token, so a login elsewhere counts here)."""
    router = APIRouter(include_in_schema=False)
    own = make_auth(settings, WebSettings())

    def auth_of(request: Request) -> Auth:
        return getattr(request.app.state, "dashboard_auth", None) or own

    @router.get("/offers", response_class=HTMLResponse)
    async def offers_page(
        request: Request,
        gpu: str | None = Query(None, max_length=40),
        count: str | None = Query(None, max_length=40),
        max_price: str | None = Query(None, alias="maxPrice", max_length=40),
        spot: str | None = Query(None, max_length=40),
    ) -> Response:
        auth = auth_of(request)
        if not may_read(request, auth):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        filters, wrong = _filters(gpu, count, max_price, spot)
        context: dict[str, Any] = {
            "form": {
                "gpu": gpu or "",
                "count": count or "",
                "maxPrice": max_price or "",
                "spot": spot if spot in SPOT_CHOICES else "",
            },
            "wrong": wrong,
            "rows": [],
            "gpus": [],
            "errors": [],
            "clouds": [],
            "asked_at": None,
            "unavailable": None,
        }
        status = 422 if wrong else 200
        if not wrong:
            try:
                found = await offers_now(request.app, store, filters["count"])
            except LoopNotRunning:
                context["unavailable"] = "The agent is not running: no cloud can be asked now."
                status = 503
            else:
                context.update(
                    rows=select(found.rows, **filters),
                    gpus=sorted({r.gpu for r in found.rows}),
                    errors=found.errors,
                    clouds=found.clouds,
                    asked_at=found.asked_at,
                )
        session = session_of(request, auth)
        return templates.TemplateResponse(
            request,
            "offers.html",
            {
                **context,
                "nav": "offers",
                "auth_open": auth.open,
                "public_read": auth.public_read,
                "logged_in": session is not None and session.authenticated,
                "can_act": may_act(request, auth),
                "csrf": auth.csrf(session) if session else "",  # the log-out form's
                "fleet": _fleet(),
            },
            status_code=status,
        )

    return router


def _fleet() -> bool:
    from procure.web import _fleet_available

    return _fleet_available()
