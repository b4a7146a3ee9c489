"""The dashboard's routes: runs, a run (with cancel), vendors, the start form, login and logout,
the run's Server-Sent Events, and (with the fleet) the Fleet and Nodes pages. Store reads run in
a thread and ticks on the agent's own loop (`app.state.agent`): no handler blocks this loop."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from procure.agent.cancel import CannotCancel
from procure.agent.tick import RunNotFound
from procure.models import RunStatus
from procure.payments.settlements import SettlementLookupError
from procure.settings import Settings
from procure.store import Store, keyset
from procure.web import actions, views
from procure.web.auth import COOKIE, Auth, Session, may_act, may_read, session_of
from procure.web.events import run_events
from procure.web.forms import form_of
from procure.web.login_limit import retry_after
from procure.web.spend import spend_total
from procure.web.templating import templates

if TYPE_CHECKING:  # the fleet modules are optional (see procure.web._fleet_available)
    from procure.fleet.settings import FleetSettings

RUN_ID = Path(min_length=1, max_length=200, pattern=r"^[^\x00]*$")
WALLET_TIMEOUT_S = 3.0


def _loopback_http(request: Request) -> bool:
    """Plain http to this machine: the one case a Secure cookie would not come back."""
    if request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https":
        return False
    host = request.url.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def set_session(request: Request, response: Response, auth: Auth, cookie: str) -> None:
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=auth.max_age_s,
        httponly=True,
        secure=not _loopback_http(request),
        samesite="strict",  # and a CSRF token in every form, as well
        path="/",
    )


def web_router(
    settings: Settings,
    store: Store,
    auth: Auth,
    *,
    fleet: bool,
    fleet_cfg: FleetSettings | None = None,
) -> APIRouter:
    """The pages; `fleet_cfg`: the settings the Fleet and Nodes pages read with (the in-server
    controller's; default: the environment's)."""
    router = APIRouter(include_in_schema=False)

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        session = session_of(request, auth)
        fresh: str | None = None
        if session is None and auth.open:  # an anonymous session, only to carry CSRF
            session, fresh = auth.new_session(authenticated=False)
        response = templates.TemplateResponse(
            request,
            name,
            {
                **context,
                "auth_open": auth.open,
                "public_read": auth.public_read,
                "logged_in": session is not None and session.authenticated,
                "can_act": may_act(request, auth),
                "csrf": auth.csrf(session) if session else "",
                "fleet": fleet,
            },
            status_code=status,
        )
        if fresh:
            set_session(request, response, auth, fresh)
        return response

    def message(request: Request, status: int, heading: str, text: str) -> Response:
        return page(request, "message.html", {"heading": heading, "message": text}, status)

    def to_login(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    async def checked_form(
        request: Request,
    ) -> tuple[dict[str, str], Session | None, Response | None]:
        """The posted form, once the session may act and its CSRF token matches."""
        form = await form_of(request)
        session = session_of(request, auth)
        if not may_act(request, auth):
            return form, session, message(request, 401, "Log in first", "Log in to do that.")
        if not auth.csrf_ok(session, form.get("csrf")):
            return (
                form,
                session,
                message(
                    request,
                    403,
                    "Refused",
                    "Missing or wrong CSRF token: reload the page and retry.",
                ),
            )
        return form, session, None

    @router.get("/", response_class=HTMLResponse)
    async def runs_page(
        request: Request,
        status: str | None = Query(None, max_length=20),
        before: str | None = Query(None, max_length=600),
        after: str | None = Query(None, max_length=600),
        last: bool = Query(False),
    ) -> Response:
        """Runs newest first; `before`/`after`: the page older/newer than a cursor (keyset),
        `last`: the oldest runs."""
        if not may_read(request, auth):
            return to_login(request)
        status = status if status in views.STATUSES else None
        try:
            older_than = keyset.decode(before) if before else None
            newer_than = keyset.decode(after) if after else None
        except keyset.BadCursor:
            return message(request, 400, "Bad page link", "That page link is not one of ours.")
        data = await asyncio.to_thread(
            functools.partial(
                views.runs, store, status, before=older_than, after=newer_than, oldest=last
            )
        )
        spend = await asyncio.to_thread(spend_total, store)  # across every run and the fleet
        return page(request, "runs.html", {**data, "spend": spend, "nav": "runs"})

    @router.get("/runs/new", response_class=HTMLResponse)
    async def start_page(request: Request) -> Response:
        if not may_read(request, auth):
            return to_login(request)
        return page(request, "start.html", await _start_context({}, []))

    async def _start_context(form: dict[str, str], errors: list[str]) -> dict[str, Any]:
        vendors = await asyncio.to_thread(views.vendors, store)
        gpus = sorted({g for row in vendors for g in row["vendor"].supported_gpu_types})
        dearest = max((row["vendor"].base_price_per_hour for row in vendors), default=None)
        first = views.first_payment(
            form, [row["vendor"] for row in vendors], settings.first_slice_fraction
        )
        return {
            "form": form,
            "errors": errors,
            "gpu_types": gpus,
            "dearest_per_hour": dearest,  # the form says what the first payment may be
            "first_payment": first,  # ... and for the values in it, how much at most
            "nav": "start",
        }

    @router.post("/runs/new")
    async def start_run(request: Request) -> Response:
        form, _session, refused = await checked_form(request)
        if refused:
            return refused
        body, errors = actions.start_request(form)
        if body is None:
            return page(request, "start.html", await _start_context(form, errors), 422)
        run = await asyncio.to_thread(actions.start_run, store, body)
        return RedirectResponse(f"/runs/{run.id}", status_code=303)

    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run_page(request: Request, run_id: str = RUN_ID) -> Response:
        if not may_read(request, auth):
            return to_login(request)
        data = await asyncio.to_thread(
            functools.partial(views.run, auth_window_s=settings.payment_window_s), store, run_id
        )
        if data is None:
            return message(request, 404, "No such run", f"There is no run {run_id}.")
        notice = request.query_params.get("notice")
        notices = {
            "cancelled": ("Run cancelled.", "good"),
            "cancelling": ("Cancel requested: the run ends as soon as its job is stopped.", ""),
        }
        text, kind = notices.get(notice or "", (None, None))
        return page(
            request, "run.html", {**data, "nav": "runs", "notice": text, "notice_kind": kind}
        )

    @router.post("/runs/{run_id}/cancel")
    async def cancel(request: Request, run_id: str = RUN_ID) -> Response:
        _form, session, refused = await checked_form(request)
        if refused:
            return refused
        who = (
            "dashboard" if auth.open else f"dashboard session {session.sid[:8] if session else ''}"
        )
        try:
            run = await actions.cancel_run(
                store, request.app.state.agent, run_id, by=who, lease_s=settings.api_lease_s
            )
        except RunNotFound:
            return message(request, 404, "No such run", f"There is no run {run_id}.")
        except CannotCancel as exc:
            return message(request, 409, "Cannot cancel", str(exc))
        notice = "cancelled" if run.status == RunStatus.cancelled else "cancelling"
        return RedirectResponse(f"/runs/{run_id}?notice={notice}", status_code=303)

    @router.get("/vendors", response_class=HTMLResponse)
    async def vendors_page(request: Request) -> Response:
        if not may_read(request, auth):
            return to_login(request)
        listed = await asyncio.to_thread(views.vendors, store)
        return page(
            request,
            "vendors.html",
            {"vendors": listed, "wallet": await _wallet(request), "nav": "vendors"},
        )

    async def _wallet(request: Request) -> dict[str, Any]:
        agent = request.app.state.agent
        address = agent.deps.account.address
        try:
            # The ledger's client belongs to the agent's loop: asked there.
            balance = await asyncio.wait_for(
                agent.call(lambda deps: deps.ledger.balance(address)), WALLET_TIMEOUT_S
            )
        except (SettlementLookupError, TimeoutError) as exc:
            return {"address": address, "balance": None, "error": str(exc) or "timed out"}
        return {"address": address, "balance": balance, "error": None}

    @router.get("/login", response_class=HTMLResponse)
    async def login_page(
        request: Request, next_: str = Query("/", alias="next", max_length=500)
    ) -> Response:
        if auth.open:
            return RedirectResponse("/", status_code=303)
        return page(request, "login.html", {"next": _safe_next(next_), "error": None})

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await form_of(request)
        target = _safe_next(form.get("next", "/"))
        if auth.open:
            return RedirectResponse("/", status_code=303)
        # No await from here on: the check and the count of a failure are one step, so that
        # parallel guesses from one address cannot all pass the check before one is counted.
        address = request.client.host if request.client else None
        wait_s = auth.logins.wait_s(address)
        if wait_s > 0:
            return _locked_out(request, target, retry_after(wait_s))
        if not auth.check_token(form.get("token", "")):
            auth.logins.failed(address)
            return page(
                request, "login.html", {"next": target, "error": "Wrong token."}, status=401
            )
        auth.logins.succeeded(address)
        _session, cookie = auth.new_session(authenticated=True)
        response = RedirectResponse(target, status_code=303)
        set_session(request, response, auth, cookie)
        return response

    def _locked_out(request: Request, target: str, after_s: str) -> Response:
        text = f"Too many wrong tokens from your address: try again in {after_s} s."
        response = page(request, "login.html", {"next": target, "error": text}, status=429)
        response.headers["Retry-After"] = after_s
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        _form, session, refused = await checked_form(request)
        if refused:
            return refused
        if session is not None:
            # The cookie alone is not enough: a copy of it must die too (kept in the store).
            await asyncio.to_thread(auth.revoke, session)
        response = RedirectResponse("/login" if not auth.open else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @router.get("/api/runs/{run_id}/events", tags=["runs"])
    async def events(
        request: Request,
        run_id: str = RUN_ID,
        after: int = Query(0, ge=0, le=2**63 - 1),
    ) -> Response:
        """Server-Sent Events: `observation` (id = observation id; resume with Last-Event-ID or
        `after`), `run` (the run's summary whenever it changes), `end` once the run has ended."""
        if not may_read(request, auth):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        last = request.headers.get("last-event-id", "")
        if last.isdecimal() and len(last) < 19:
            after = max(after, int(last))
        return StreamingResponse(
            run_events(
                store,
                run_id,
                after,
                request.is_disconnected,
                auth_window_s=settings.payment_window_s,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    if fleet:
        from procure.web.fleet_pages import add_fleet_routes

        add_fleet_routes(
            router,
            store,
            fleet_cfg=fleet_cfg,
            page=page,
            message=message,
            checked_form=checked_form,
            may_read=lambda request: may_read(request, auth),
            to_login=to_login,
        )
        from procure.web.nodes_pages import add_nodes_routes

        add_nodes_routes(
            router,
            store,
            fleet_cfg=fleet_cfg,
            page=page,
            may_read=lambda request: may_read(request, auth),
            to_login=to_login,
        )
    return router


def _safe_next(target: str) -> str:
    """Only a path on this site (never `//host` or a scheme): no open redirect after login."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
