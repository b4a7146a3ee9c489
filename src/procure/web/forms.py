"""Reading an HTML form post (application/x-www-form-urlencoded) without another dependency; the
body is already bounded by the app's BoundedRequests middleware."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

MAX_FIELDS = 50


async def form_of(request: Request) -> dict[str, str]:
    """The form's fields, the first value of each; an empty dict for anything not a form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:  # too many fields: not one of our forms
        return {}
    fields: dict[str, str] = {}
    for key, value in pairs:
        fields.setdefault(key, value.replace("\x00", ""))
    return fields
