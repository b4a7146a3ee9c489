"""The Jinja2 environment of the dashboard: autoescaped templates and the filters they use."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi.templating import Jinja2Templates

from procure.models import format_usd

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"


def _when(value: datetime | None) -> str:
    return "—" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters.update(usd=format_usd, when=_when, pct=_pct)
