"""Tests' own one-off requests (`httpx.get(url)` and the like, to servers on loopback) wait 30 s
for an answer rather than httpx's 5 s: on a busy machine a server may take longer than that to
answer, and a test must fail for what it checks, not for the load beside it. The project's own
code passes its timeouts explicitly and is not affected."""

from __future__ import annotations

import httpx

PATIENT = httpx.Timeout(30.0)


def make_one_off_requests_patient() -> None:
    for call in (
        httpx.request,
        httpx.get,
        httpx.post,
        httpx.put,
        httpx.patch,
        httpx.delete,
        httpx.head,
        httpx.options,
        httpx.stream,
    ):
        defaults = call.__kwdefaults__
        if defaults and "timeout" in defaults:
            defaults["timeout"] = PATIENT
