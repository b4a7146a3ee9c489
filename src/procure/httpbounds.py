"""Outbound HTTP with one overall deadline and a bounded answer, for every call we make (vendors,
facilitator, LLM, clouds, nodes).

httpx's timeouts are per phase (connect, each read), so an answer that drips one byte a second
never times out. `BoundedTransport` runs the whole exchange, connect to last byte, under one
`asyncio.timeout`, reads at most `max_bytes` (decompressing itself, so a zip bomb stops at the
same bound), and refuses JSON nested deeper than `bounds.MAX_JSON_DEPTH` before anyone parses it.
Its failures are `httpx` errors, so callers handle them as they handle a refused connection.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ssl
import zlib
from typing import Any

import httpx

from procure.bounds import MAX_ANSWER_BYTES, MAX_JSON_DEPTH, UnsafeInput, check_json

# x402 carries base64 JSON in these headers; they are parsed by the SDK, so they are checked too.
_JSON_HEADERS = ("payment-required", "payment-response", "payment-signature", "x-payment")
# Methods that may be sent twice (RFC 9110 9.2.2), and the failures that happen before any
# answer when a pooled connection was closed by the server while idle (its keep-alive ran out
# just as we reused it): such a request is sent once more, on a new connection, as urllib3 does.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
_STALE_CONNECTION = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every client we open: building one reads the whole CA
    bundle (about 50 ms of CPU), and the agent opens clients per tick and per vendor. Shared:
    never load a client certificate into it (a client that needs one gets its own context)."""
    return httpx.create_ssl_context()


class AnswerRejected(httpx.DecodingError):
    """The answer was too large, too deep, or encoded in a way we do not decode."""


class DeadlineExceeded(httpx.ReadTimeout):
    """The whole exchange did not finish within its deadline."""


class BoundedTransport(httpx.AsyncBaseTransport):
    """Wraps `inner` (default: real sockets): each request gets `deadline_s` in all and an answer
    of at most `max_bytes`, JSON of at most `max_depth` levels."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        deadline_s: float,
        max_bytes: int = MAX_ANSWER_BYTES,
        max_depth: int = MAX_JSON_DEPTH,
    ) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport(verify=tls_context())
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Ask for an uncompressed answer; one that comes compressed anyway is decoded below.
        request.headers["Accept-Encoding"] = "identity"
        try:
            async with asyncio.timeout(self.deadline_s):
                response = await self._send(request)
                try:
                    raw = await _read_capped(response, request, self.max_bytes)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no complete answer within {self.deadline_s:g}s", request=request
            ) from None
        headers = httpx.Headers(response.headers)
        body = _decode(raw, headers, self.max_bytes, request)
        self._check(body, headers, request)
        headers.pop("content-encoding", None)
        headers["content-length"] = str(len(body))
        return httpx.Response(
            status_code=response.status_code,
            headers=headers,
            content=body,
            request=request,
            extensions={k: v for k, v in response.extensions.items() if k != "network_stream"},
        )

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.inner.handle_async_request(request)
        except _STALE_CONNECTION:
            if request.method not in _IDEMPOTENT:
                raise  # it may have been acted on: only its caller knows whether to resend
            return await self.inner.handle_async_request(request)

    def _check(self, body: bytes, headers: httpx.Headers, request: httpx.Request) -> None:
        try:
            stripped = body.lstrip()[:1]
            if "json" in headers.get("content-type", "") or stripped in (b"[", b"{"):
                check_json(body, max_bytes=self.max_bytes, max_depth=self.max_depth)
            for name in _JSON_HEADERS:
                value = headers.get(name)
                if value:
                    check_json(_b64(value), max_depth=self.max_depth)
        except UnsafeInput as exc:
            raise AnswerRejected(f"answer refused: {exc}", request=request) from None

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _read_capped(response: httpx.Response, request: httpx.Request, max_bytes: int) -> bytes:
    length = response.headers.get("content-length", "")
    if length.isdecimal() and int(length) > max_bytes:
        raise AnswerRejected(
            f"answer refused: {int(length):,} bytes, more than the {max_bytes:,} allowed",
            request=request,
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise AnswerRejected(
                f"answer refused: more than the {max_bytes:,} bytes allowed",
                request=request,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(raw: bytes, headers: httpx.Headers, max_bytes: int, request: httpx.Request) -> bytes:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding not in ("gzip", "deflate"):
        raise AnswerRejected(f"answer refused: content-encoding {encoding!r}", request=request)
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    try:
        inflater = zlib.decompressobj(wbits)
        body = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as exc:
        raise AnswerRejected(
            f"answer refused: bad {encoding} data: {exc}", request=request
        ) from None
    if len(body) > max_bytes or inflater.unconsumed_tail:
        raise AnswerRejected(
            f"answer refused: decompresses past the {max_bytes:,} bytes allowed", request=request
        )
    return body


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=False)
    except ValueError:
        return b""


def bounded_client(
    *,
    deadline_s: float,
    max_bytes: int = MAX_ANSWER_BYTES,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose every request is bounded (see `BoundedTransport`).
    `transport` is the inner one (e.g. an ASGI transport in tests)."""
    return httpx.AsyncClient(
        transport=BoundedTransport(transport, deadline_s=deadline_s, max_bytes=max_bytes),
        timeout=httpx.Timeout(deadline_s),
        **kwargs,
    )
