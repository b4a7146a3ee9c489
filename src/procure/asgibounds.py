"""Inbound bounds for every service we run (API, facilitator, mock vendor, mock cloud, GPU node):
a request body larger than `max_bytes` gets a 413, JSON nested deeper than `max_depth` (in the
body or in an x402 header) or holding text that is not Unicode (`not_text`) a 400, all in the
`{"error": ...}` envelope, before any route, any authentication, or any JSON parser sees it.

A number no float can be (NaN, Infinity, 1e999) is refused deeper, where the field is known:
each app answers its validation errors with `answer_invalid_requests` (FastAPI's own answer
quotes the input and cannot render such a number: a 500), and the models that take numbers
from outside say `allow_inf_nan=False`.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from procure.bounds import MAX_JSON_DEPTH, MAX_REQUEST_BYTES, as_utf8, clip, json_depth

_JSON_HEADERS = (b"payment-signature", b"x-payment", b"payment-required", b"payment-response")
# Half a UTF-16 surrogate pair, escaped, in JSON text whose escaped backslashes (`\\`) were
# each replaced by one other byte: every backslash left starts an escape. A high half not
# followed by a low one, or a low one not preceded by a high one.
_ESCAPED_BACKSLASH = re.compile(rb"\\\\")
_LONE_HIGH = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")
_LONE_LOW = re.compile(  # found by its `\u` first (a prefix the engine scans for quickly)
    rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}(?<!\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
# UTF-8's spelling of a UTF-16 surrogate: not UTF-8, yet `json.loads` reads bytes with
# "surrogatepass" and so takes it as a lone surrogate.
_RAW_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")


class BoundedRequests:
    """Pure ASGI middleware: buffers the body (at most `max_bytes`), checks it, replays it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int = MAX_REQUEST_BYTES,
        max_depth: int = MAX_JSON_DEPTH,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        for name in _JSON_HEADERS:
            value = headers.get(name)
            if value and json_depth(_b64(value)) > self.max_depth:
                return await _refuse(send, 400, f"the {name.decode()} header nests too deep")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _refuse(send, 413, self._too_large())
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _refuse(send, 413, self._too_large())
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and json_depth(body) > self.max_depth:
            return await _refuse(
                send, 400, f"invalid request: JSON nested deeper than {self.max_depth} levels"
            )
        if body and _json_body(headers) and (why := not_text(body)):
            return await _refuse(send, 400, f"invalid request: {why}")
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as servers do

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body too large: at most {self.max_bytes:,} bytes"


def _json_body(headers: dict[bytes, bytes]) -> bool:
    """Whether a framework would read the body as JSON: said so, or nothing said (FastAPI
    parses a body without a content type as JSON)."""
    kind = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return not kind or kind == b"application/json" or kind.endswith(b"+json")


def not_text(body: bytes) -> str | None:
    """Why a JSON body holds what no string of ours may (or None): half a UTF-16 surrogate
    pair, escaped (`"\\ud800"`, which JSON's grammar allows) or spelled in UTF-8 bytes.
    Parsed, it is a lone surrogate that is not Unicode: FastAPI's own 422 quotes the input and
    could not be encoded (a 500), and a route that let it through crashed any store, file or
    log writing it as UTF-8. Linear: a few passes in C, whatever the body holds. A body in
    UTF-16 or UTF-32 (which JSON's parser reads too) is looked at as UTF-8 (`bounds.as_utf8`)."""
    body = as_utf8(body)
    if _RAW_SURROGATE.search(body):
        return "the body is not UTF-8"
    if b"\\u" not in body:
        return None
    escapes = _ESCAPED_BACKSLASH.sub(b"#", body) if b"\\\\" in body else body
    if _LONE_HIGH.search(escapes) or _LONE_LOW.search(escapes):
        return "half a UTF-16 surrogate pair in a JSON string"
    return None


MAX_PROBLEMS = 10
"""Validation errors named in one answer: the rest are counted, not listed."""


def field_problems(errors: Sequence[Any]) -> list[str]:
    """Pydantic's errors as `field: message` lines (the `body` prefix left out), never quoting
    the input: FastAPI's own answer quotes it, and a number no float can be (NaN, Infinity,
    1e999 read as infinity) cannot be rendered as JSON (a 500). At most MAX_PROBLEMS lines,
    each clipped: a body of 10,000 wrong items is named in a few lines, not echoed."""
    lines = [
        clip(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            f"{e.get('msg', 'invalid')}",
            300,
        )
        # A key or a validator's message may carry what UTF-8 cannot (half a surrogate pair
        # from a path or query): replaced, so the answer can always be written.
        .encode("utf-8", "replace")
        .decode("utf-8")
        for e in errors[:MAX_PROBLEMS]
    ]
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"... and {len(errors) - MAX_PROBLEMS:,} more")
    return lines


def answer_invalid_requests(
    app: FastAPI, render: Callable[[list[str]], Response] | None = None
) -> None:
    """Answer the app's request validation errors from `field_problems`, in the app's own
    envelope (`render`) or in ours: a 422 `{"error": "invalid request: hours: Input should
    be a finite number", "details": [...]}`."""

    def ours(found: list[str]) -> Response:
        return JSONResponse(
            {"error": "invalid request: " + "; ".join(found), "details": found}, status_code=422
        )

    answer = render or ours

    async def invalid(_request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        return answer(field_problems(list(errors)))

    app.add_exception_handler(RequestValidationError, invalid)


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _b64(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return b""
