"""ASGI plumbing of the mock vendor (and the gateway, which sells the same way): a pure ASGI
layer around the routes, and the x402 middlewares run only for the requests they can act on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


class Innermost:
    """Pure ASGI middleware calling `handler(scope, receive, send, inner)` for HTTP requests."""

    def __init__(self, app: ASGIApp, handler: Callable[..., Awaitable[None]]) -> None:
        self.app, self.handler = app, handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.handler(scope, receive, send, self.app)


UNPAID_POSTS = frozenset({"/quote", "/cancel-job", "/admin/faults"})


class PaidChain:
    """Runs `chain` (`@app.middleware("http")`-style functions, innermost first) only for
    requests they can act on: POSTs other than the unpaid routes. The rest go straight in,
    without a BaseHTTPMiddleware layer (a task group and a stream each) per function."""

    def __init__(self, app: ASGIApp, chain: list[Callable[..., Awaitable[Response]]]) -> None:
        self.app = app
        paid: ASGIApp = app
        for dispatch in chain:
            paid = BaseHTTPMiddleware(paid, dispatch=dispatch)
        self.paid = paid

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] not in UNPAID_POSTS
        ):
            return await self.paid(scope, receive, send)
        await self.app(scope, receive, send)
