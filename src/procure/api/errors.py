"""What every procure API answers when a request goes wrong: the request bounds (outermost, before
any parser or authentication) and one `{"error": ...}` envelope for 4xx and 500 alike."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.bounds import clip

log = logging.getLogger(__name__)


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def install(app: FastAPI) -> None:
    """Bound the app's requests and answer every failure in the envelope."""
    app.add_middleware(BoundedRequests)
    # 422 `{"error": "invalid request: budgetTotal: …", "details": [...]}`, never quoting the
    # input (FastAPI's own answer could not render NaN or 1e999: a 500). The shared answer,
    # as every other app of ours gives it.
    answer_invalid_requests(app)

    # Starlette's own answers (404 unknown route, 405 wrong method, ...) and every
    # HTTPException raised by a route: all in the `{"error": ...}` envelope.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        message = str(exc.detail)
        path = clip(request.url.path, 200)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {path}"
        elif exc.status_code == 405 and message == "Method Not Allowed":
            message = f"method {request.method} not allowed on {path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DataError)
    async def refused_by_the_store(request: Request, exc: DataError) -> JSONResponse:
        # A value the database cannot keep or compare (e.g. a NUL character on PostgreSQL) that
        # validation let through: the client's input, so a 422, never a 500.
        reason = (str(exc.orig or exc).splitlines() or [""])[0]
        log.warning(
            "the store refused a value on %s %s: %s",
            request.method,
            clip(request.url.path, 200),
            clip(reason, 200),
        )
        return error(422, "invalid request: a value the store cannot keep (e.g. a NUL character)")

    @app.exception_handler(Exception)
    async def crashed(_request: Request, _exc: Exception) -> JSONResponse:
        # A bug, never bad input: the server logs the traceback; the client gets the envelope.
        return error(500, "internal error")
