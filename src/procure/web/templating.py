"""The Jinja2 environment of the dashboard: autoescaped templates and the filters they use."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi.templating import Jinja2Templates

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


templates = Jinja2Templates(directory=HERE / "templates")


templates.env.filters.update(
    usd=format_usd,
    dollars=format_dollars,
    when=_when,
    pct=_pct,
    duration=_duration,
    iso_when=_iso_when,
)
