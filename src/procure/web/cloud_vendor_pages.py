"""The dashboard's "Add a cloud account" form (`/vendors/cloud/new`): the same registration as
`POST /api/vendors/cloud`, with CSRF as the other forms, and errors named by the form's labels."""

from __future__ import annotations

import asyncio
import math
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from procure.agent.cloud_vendors import (
    MAX_COUNT,
    MAX_PRICE_PER_HOUR_USD,
    MIN_PRICE_PER_HOUR_USD,
    CloudVendorRequest,
    NotACloudVendor,
    save_cloud_vendor,
)
from procure.settings import Settings
from procure.store import Store
from procure.web.auth import Auth, make_auth, may_act, may_read, session_of
from procure.web.forms import form_of
from procure.web.pages import set_session
from procure.web.settings import WebSettings
from procure.web.templating import templates

PATH = "/vendors/cloud/new"
PROVIDERS = {"lambda": "Lambda", "runpod": "RunPod", "vast": "Vast.ai"}
# Each request field: the form's label and what it must be, so an error reads like the form.
LABELS = {
    "provider": ("Provider", "Lambda, RunPod or Vast.ai"),
    "gpu": ("GPU model", "letters, digits, spaces, dots, dashes and underscores, e.g. A100"),
    "count": ("GPUs per instance", f"a whole number from 1 to {MAX_COUNT}"),
    "maxPricePerHour": (
        "Max price (US dollars per hour)",
        f"a number from {MIN_PRICE_PER_HOUR_USD} to {MAX_PRICE_PER_HOUR_USD:,}",
    ),
    "spot": ("Interruptible offers", "yes or no"),
    "regions": (
        "Regions",
        "by commas: ids as the cloud names them (us-east-1), or Vast.ai's places (Oregon, US)",
    ),
    "image": ("Container image", "an image reference without spaces, at most 300 characters"),
    "vendorId": ("Vendor id", "letters, digits, dots, dashes and underscores, at most 64"),
    "reliability": ("Prior reliability", "a number from 0 to 1"),
}
FIELDS = ("provider", "gpu", "count", "maxPricePerHour", "spot", "regions", "image")
FIELDS += ("vendorId", "reliability")


def _wrong(field: str) -> str:
    label, rule = LABELS[field]
    return f"{label}: {rule}"


def _number(text: str, whole: bool) -> int | float | None:
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        return None
    return None if isinstance(value, float) and not math.isfinite(value) else value


def parse(form: dict[str, str]) -> tuple[CloudVendorRequest | None, list[str]]:
    """The request the form describes, or what is wrong with it (named by the form's labels)."""
    given = {k: form.get(k, "").strip() for k in FIELDS}
    data: dict[str, Any] = {"provider": given["provider"], "gpu": given["gpu"]}
    wrong: list[str] = []
    numbers = (("count", True, "1"), ("maxPricePerHour", False, ""), ("reliability", False, "0.9"))
    for field, whole, default in numbers:
        value = _number(given[field] or default, whole)
        if value is None:
            wrong.append(_wrong(field))
        else:
            data[field] = float(value) if not whole else value
    if given["spot"] not in ("", "yes", "no"):
        wrong.append(_wrong("spot"))
    data["spot"] = given["spot"] == "yes"
    data["regions"] = regions(given["regions"])
    data["image"] = given["image"] or None
    data["vendorId"] = given["vendorId"] or None
    try:
        body = CloudVendorRequest.model_validate(data)
    except ValidationError as exc:
        named = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        wrong += [_wrong(f) for f in FIELDS if f in named and _wrong(f) not in wrong]
        return None, wrong or ["The form is not one of ours: reload the page and retry."]
    return (None, wrong) if wrong else (body, [])


def cloud_vendor_pages(settings: Settings, store: Store) -> APIRouter:
    """`GET` and `POST /vendors/cloud/new`. Sessions and CSRF as the other pages: with the
    dashboard's own Auth when the app keeps it in `app.state.dashboard_auth`, else one made from
    the same settings (with a token, sessions are signed with a key derived from it)."""
    router = APIRouter(include_in_schema=False)
    own = make_auth(settings, WebSettings())

    def auth_of(request: Request) -> Auth:
        return getattr(request.app.state, "dashboard_auth", None) or own

    def page(request: Request, auth: Auth, context: dict[str, Any], status: int) -> Response:
        session = session_of(request, auth)
        fresh: str | None = None
        if session is None and auth.open:  # an anonymous session, only to carry CSRF
            session, fresh = auth.new_session(authenticated=False)
        response = templates.TemplateResponse(
            request,
            "cloud_vendor_new.html",
            {
                "providers": PROVIDERS,
                "nav": "vendors",
                **context,
                "auth_open": auth.open,
                "public_read": auth.public_read,
                "logged_in": session is not None and session.authenticated,
                "can_act": may_act(request, auth),
                "csrf": auth.csrf(session) if session else "",
                "fleet": _fleet(),
            },
            status_code=status,
        )
        if fresh:
            set_session(request, response, auth, fresh)
        return response

    @router.get(PATH, response_class=HTMLResponse)
    async def new_cloud_vendor(request: Request) -> Response:
        auth = auth_of(request)
        if not may_read(request, auth):
            return RedirectResponse(f"/login?next={quote(PATH)}", status_code=303)
        return page(request, auth, {"form": {}, "errors": []}, 200)

    @router.post(PATH)
    async def add_cloud_vendor(request: Request) -> Response:
        auth = auth_of(request)
        form = await form_of(request)
        if not may_act(request, auth):
            return _message(request, auth, 401, "Log in first", "Log in to add a cloud account.")
        if not auth.csrf_ok(session_of(request, auth), form.get("csrf")):
            text = "Missing or wrong CSRF token: reload the page and retry."
            return _message(request, auth, 403, "Refused", text)
        body, errors = parse(form)
        if body is not None:
            try:
                _saved = await asyncio.to_thread(save_cloud_vendor, store, body)
            except NotACloudVendor as exc:
                errors = [f"Vendor id: {exc} is already an x402 vendor; choose another id"]
            else:
                return RedirectResponse("/vendors", status_code=303)
        return page(request, auth, {"form": form, "errors": errors}, 422)

    def _message(request: Request, auth: Auth, status: int, heading: str, text: str) -> Response:
        session = session_of(request, auth)
        return templates.TemplateResponse(
            request,
            "message.html",
            {
                "heading": heading,
                "message": text,
                "nav": "vendors",
                "auth_open": auth.open,
                "public_read": auth.public_read,
                "logged_in": session is not None and session.authenticated,
                "can_act": may_act(request, auth),
                "csrf": auth.csrf(session) if session else "",
                "fleet": _fleet(),
            },
            status_code=status,
        )

    return router


def _fleet() -> bool:
    from procure.web import _fleet_available

    return _fleet_available()


def regions(text: str) -> list[str]:
    """The regions a form lists by commas. A Vast.ai region is a place and its country code
    ("Oregon, US"): a bare two-letter code is the end of the place before it, not a region."""
    found: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if found and len(piece) == 2 and piece.isalpha() and piece.isupper():
            found[-1] = f"{found[-1]}, {piece}"
        else:
            found.append(piece)
    return found
