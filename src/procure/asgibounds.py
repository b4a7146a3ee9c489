"""Inbound bounds for every service we run (API, facilitator, mock vendor, mock cloud, GPU node):
a request body larger than `max_bytes` gets a 413, JSON nested deeper than `max_depth` (in the
body or in an x402 header) a 400, both in the `{"error": ...}` envelope, before any route, any
authentication, or any JSON parser sees it.
"""

from __future__ import annotations

import base64
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from procure.bounds import MAX_JSON_DEPTH, MAX_REQUEST_BYTES, json_depth

_JSON_HEADERS = (b"payment-signature", b"x-payment", b"payment-required", b"payment-response")


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
