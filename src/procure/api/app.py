"""The FastAPI app: its factory and lifespan (worker, fleet), error envelopes, the token checks,
and one router per resource (runs, vendors, fleet, nodes, ops) plus the dashboard's pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.agent.runtime import close_deps, make_deps
from procure.agent.tick import AgentDeps
from procure.agent.worker import Worker, WorkerConfig, WorkerLockHeld, sqlite_worker_lock
from procure.api.fleet import fleet_router
from procure.api.nodes import nodes_router
from procure.api.ops import ops_router
from procure.api.runs import runs_router
from procure.api.schemas import problems
from procure.api.vendors import vendors_router
from procure.asgibounds import BoundedRequests
from procure.bearer import bearer_matches
from procure.bounds import clip
from procure.fleet.inprocess import FleetRun, fleet_in_server
from procure.settings import Settings
from procure.store import Store
from procure.web import mount_dashboard
from procure.web.settings import WebSettings

log = logging.getLogger(__name__)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def create_app(
    settings: Settings,
    store: Store,
    *,
    deps: AgentDeps | None = None,
    worker: WorkerConfig | None = None,
    fleet: FleetRun | None = None,
) -> FastAPI:
    """The API over `store`. `deps` may be given (tests, in-process vendors); else built.
    With `worker`, a worker runs in the server's event loop for the app's lifetime, so runs
    advance without anyone calling the tick endpoint (`procure serve` does this by default).
    With `fleet`, the fleet controller runs there too (`procure serve --fleet`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = deps is None
        app.state.deps = deps or make_deps(settings, store)
        app.state.worker = None
        async with contextlib.AsyncExitStack() as stack:
            if worker is not None:
                await stack.enter_async_context(_run_worker(app, worker))
            app.state.fleet = None
            if fleet is not None:
                app.state.fleet = await stack.enter_async_context(fleet_in_server(store, fleet))
            yield
        if owned:
            await close_deps(app.state.deps)

    @asynccontextmanager
    async def _run_worker(app: FastAPI, cfg: WorkerConfig) -> AsyncIterator[None]:
        """The in-process worker: started with the app, drained and stopped on shutdown."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(sqlite_worker_lock(store))
            except WorkerLockHeld as exc:
                log.warning("not running a worker in this server: %s", exc)
                yield
                return
            worker_ = app.state.worker = Worker(app.state.deps, cfg)
            task = asyncio.create_task(worker_.run(), name="procure-worker")
            try:
                yield
            finally:
                worker_.stop()
                try:
                    await asyncio.wait_for(task, cfg.drain_timeout_s + 10)
                except TimeoutError:
                    log.error("the in-process worker did not stop in time")

    app = FastAPI(
        title="procure",
        version="0.1.0",
        description="Rents GPU compute for a goal within a hard budget, paying over x402.",
        lifespan=lifespan,
    )

    app.add_middleware(BoundedRequests)  # outermost: before any parser or authentication

    def require_token(authorization: str | None = Header(None)) -> None:
        if settings.api_token is None:
            return
        if not bearer_matches(authorization, settings.api_token.get_secret_value()):
            raise HTTPException(401, "missing or wrong bearer token")

    public_read = WebSettings().public_read

    def require_read(authorization: str | None = Header(None)) -> None:
        """Reads need the token too, when one is set, unless PROCURE_PUBLIC_READ=true."""
        if not public_read:
            require_token(authorization)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        found = problems(list(exc.errors()))
        return _error(422, "invalid request: " + "; ".join(found), details=found)

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

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with its 422 answer described as the envelope we send."""
        if app.openapi_schema is None:
            document = default_openapi()
            document.get("components", {}).get("schemas", {})["HTTPValidationError"] = {
                "title": "Error",
                "type": "object",
                "properties": {
                    "error": {"type": "string"},
                    "details": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["error"],
            }
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

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
        return _error(422, "invalid request: a value the store cannot keep (e.g. a NUL character)")

    @app.exception_handler(Exception)
    async def crashed(_request: Request, _exc: Exception) -> JSONResponse:
        # A bug, never bad input: the server logs the traceback; the client gets the envelope.
        return _error(500, "internal error")

    app.include_router(runs_router(settings, store, require_token, require_read))
    app.include_router(vendors_router(settings, store, require_token, require_read))
    app.include_router(fleet_router(store, require_token, require_read=require_read))
    app.include_router(nodes_router(store, require_read))
    app.include_router(ops_router(store))
    mount_dashboard(app, settings, store)  # the operator's pages at `/` (procure.web)
    return app
