"""The Jinja2 environment of the dashboard: autoescaped templates and the filters they use."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates
from starlette.templating import _TemplateResponse

from procure.models import format_dollars, format_usd

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"


def _when(value: datetime | None) -> str:
    return "—" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _duration(seconds: float | None) -> str:
    """A span for people: 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
    if seconds is None:
        return "—"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    if hours < 1:
        return f"{minutes} min"
    if days < 1:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{days} d {hours % 24} h"


def _iso_when(value: str | None) -> str:
    """An ISO time from a JSON view, as the pages show times."""
    return "—" if not value else _when(datetime.fromisoformat(value))


# Every page: never framed (a foreign page on another port of this machine is same-site, so
# the SameSite cookie goes with it: it could frame Cancel run or Approve under a decoy), no
# script or style but the app's own files (the templates have no inline ones), and not kept by
# the browser or a proxy (they show spend and the wallet: gone from the Back button at Log out).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Templates(Jinja2Templates):
    """Jinja2Templates whose every page carries SECURITY_HEADERS: the dashboard's pages are
    built in several modules (pages, offers, cloud accounts), all through this one."""

    def TemplateResponse(self, *args: Any, **kwargs: Any) -> _TemplateResponse:
        response = super().TemplateResponse(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


templates = Templates(directory=HERE / "templates")


templates.env.filters.update(
    usd=format_usd,
    dollars=format_dollars,
    when=_when,
    pct=_pct,
    duration=_duration,
    iso_when=_iso_when,
)
