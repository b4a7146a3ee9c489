"""The Fleet page's routes: the page, and Approve / Reject of a pending action (CSRF-checked,
through the fleet's own `decide`, as the API's routes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from procure.fleet.settings import FleetSettings
from procure.store import Store
from procure.web import fleet

ACTION_ID = Path(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:-]+$")
Page = Callable[..., Response]
CheckedForm = Callable[[Request], Awaitable[tuple[dict[str, str], Any, Response | None]]]


def add_fleet_routes(
    router: APIRouter,
    store: Store,
    *,
    page: Page,
    message: Callable[[Request, int, str, str], Response],
    checked_form: CheckedForm,
    may_read: Callable[[Request], bool],
    to_login: Callable[[Request], Response],
    fleet_cfg: FleetSettings | None = None,
) -> None:
    cfg = fleet_cfg or FleetSettings()

    @router.get("/fleet", response_class=HTMLResponse)
    async def fleet_page(request: Request) -> Response:
        if not may_read(request):
            return to_login(request)
        data = await asyncio.to_thread(fleet.fleet_view, store, cfg)
        notices = {
            "approved": "Approved: the controller carries it out at its next scan.",
            "rejected": "Rejected: nothing is done.",
        }
        notice = notices.get(request.query_params.get("notice", ""))
        return page(
            request,
            "fleet.html",
            {**data, "nav": "fleet", "notice": notice, "notice_kind": "good" if notice else None},
        )

    async def _decide(request: Request, action_id: str, approve: bool) -> Response:
        _form, _session, refused = await checked_form(request)
        if refused:
            return refused
        try:
            await asyncio.to_thread(
                fleet.approve_or_reject, store, cfg, action_id, approve, "dashboard"
            )
        except KeyError:
            return message(request, 404, "No such action", f"There is no action {action_id}.")
        except fleet.ActionRefused as exc:
            return message(request, 409, "Refused", str(exc))
        notice = "approved" if approve else "rejected"
        return RedirectResponse(f"/fleet?notice={notice}", status_code=303)

    @router.post("/fleet/actions/{action_id}/approve")
    async def approve(request: Request, action_id: str = ACTION_ID) -> Response:
        return await _decide(request, action_id, True)

    @router.post("/fleet/actions/{action_id}/reject")
    async def reject(request: Request, action_id: str = ACTION_ID) -> Response:
        return await _decide(request, action_id, False)
