"""The FastAPI app: the seeds' agent endpoints (`/api/agent-start|tick|status`), resource routes
beside them, `/metrics` and `/healthz`. Mutating routes need the bearer token when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.agent.cancel import CannotCancel, request_cancel
from procure.agent.runtime import close_deps, make_deps
from procure.agent.tick import AgentDeps, RunNotFound
from procure.agent.worker import (
    LeaseHeld,
    Worker,
    WorkerConfig,
    WorkerLockHeld,
    sqlite_worker_lock,
    tick_under_lease,
)
from procure.api import metrics
from procure.api.fleet import fleet_router
from procure.api.schemas import (
    NO_NUL,
    CancelRequest,
    StartRequest,
    TickRequest,
    VendorRegistration,
    problems,
)
from procure.asgibounds import BoundedRequests
from procure.bounds import clip
from procure.fleet.inprocess import FleetRun, fleet_in_server
from procure.models import RunStatus, utcnow
from procure.settings import Settings
from procure.store import Store, repo
from procure.vendors.credentials import CredentialError, Keyring
from procure.web import mount_dashboard
from procure.web.settings import WebSettings

OBSERVATIONS_PAGE = 1000
OBSERVATIONS_PAGE_MAX = 5000
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
        expected = f"Bearer {settings.api_token.get_secret_value()}"
        if not secrets.compare_digest(authorization or "", expected):
            raise HTTPException(401, "missing or wrong bearer token")

    public_read = WebSettings().public_read

    def require_read(authorization: str | None = Header(None)) -> None:
        """Reads need the token too, when one is set, unless PROCURE_PUBLIC_READ=true."""
        if not public_read:
            require_token(authorization)

    readers = [Depends(require_read)]

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

    @app.post("/api/agent-start", status_code=201, dependencies=[Depends(require_token)])
    async def agent_start(body: StartRequest) -> dict[str, Any]:
        with store.session() as s:
            run = repo.create_run(
                s,
                user_id=body.user_id,
                goal=body.goal,
                budget_total=body.budget_micros(),
                job_spec=body.job_spec(),
                deadline=body.deadline_at(utcnow()),
            )
        metrics.RUNS_STARTED.inc()
        return run.to_json()

    @app.post("/api/agent-tick", dependencies=[Depends(require_token)])
    async def agent_tick(body: TickRequest, request: Request) -> JSONResponse:
        """One tick, holding the run's lease: 409 while a worker (or another call) holds it."""
        owner = f"api-{uuid.uuid4().hex[:8]}"
        try:
            with metrics.TICK_SECONDS.time():
                result = await tick_under_lease(
                    request.app.state.deps, body.run_id, owner, settings.api_lease_s
                )
        except RunNotFound:
            return _error(404, f"run {body.run_id} not found")
        except LeaseHeld as exc:
            return _error(409, f"{exc}; try again", holder=exc.holder)
        metrics.TICKS.labels(result.message.split(" (")[0]).inc()
        return JSONResponse(result.to_json())

    def status_of(run_id: str, after: int, limit: int) -> dict[str, Any]:
        """The seeds' status shape, with one page of observations and the next page's cursor
        (`observationsNext`, null on the last page)."""
        with store.session() as s:
            page = repo.load_state_page(s, run_id, observations_after=after, limit=limit)
        if page is None:
            raise HTTPException(404, f"run {run_id} not found")
        state, after_next = page
        return {**state.to_json(), "observationsNext": after_next}

    observations_after = Query(
        0,
        alias="observationsAfter",
        ge=0,
        le=2**63 - 1,
        description="Return observations with an id above this cursor (observationsNext)",
    )
    observations_limit = Query(
        OBSERVATIONS_PAGE,
        alias="observationsLimit",
        ge=1,
        le=OBSERVATIONS_PAGE_MAX,
        description="Observations per page",
    )

    @app.get("/api/agent-status", dependencies=readers)
    async def agent_status(
        run_id: str = Query(alias="runId", min_length=1, max_length=200, pattern=NO_NUL),
        after: int = observations_after,
        limit: int = observations_limit,
    ) -> dict[str, Any]:
        return status_of(run_id, after, limit)

    @app.get("/api/runs", dependencies=readers)
    async def runs(limit: int = Query(50, ge=1, le=500), status: str | None = None) -> list[Any]:
        with store.session() as s:
            return [r.to_json() for r in repo.list_runs(s, limit=limit, status=status)]

    @app.get("/api/runs/{run_id}", dependencies=readers)
    async def run_detail(
        run_id: str = Path(min_length=1, max_length=200, pattern=NO_NUL),
        after: int = observations_after,
        limit: int = observations_limit,
    ) -> dict[str, Any]:
        return status_of(run_id, after, limit)

    @app.post("/api/runs/{run_id}/cancel", dependencies=[Depends(require_token)])
    async def cancel_run(
        request: Request,
        run_id: str = Path(min_length=1, max_length=200),
        body: CancelRequest | None = None,
    ) -> JSONResponse:
        """Stop a run: its job is cancelled at the vendor and no new payment starts. 200 with
        the run once it is `cancelled`; 202 while a worker holding the run finishes it; 409 if
        it already ended otherwise. Cancelling twice is fine."""
        body = body or CancelRequest()
        try:
            run = request_cancel(store, run_id, by=body.requested_by or "api", reason=body.reason)
        except RunNotFound:
            return _error(404, f"run {run_id} not found")
        except CannotCancel as exc:
            return _error(409, str(exc))
        if run.status == RunStatus.running:  # carry it out now if nobody else is ticking it
            owner = f"api-cancel-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(LeaseHeld):
                await tick_under_lease(request.app.state.deps, run_id, owner, settings.api_lease_s)
            with store.session() as s:
                run = repo.get_run(s, run_id) or run
        if run.status == RunStatus.cancelled:
            return JSONResponse({"message": "Run cancelled", "run": run.to_json()})
        return JSONResponse(
            {
                "message": "Cancel requested; the run ends as soon as its job is stopped",
                "run": run.to_json(),
            },
            status_code=202,
        )

    @app.get("/api/vendors", dependencies=readers)
    async def vendors() -> list[Any]:
        from procure.agent.context import hazard, reliability

        with store.session() as s:
            return [
                {
                    **v.to_json(),
                    "learnedReliability": round(reliability(v), 4),
                    "hazardPerHour": round(hazard(v), 6),
                }
                for v in repo.list_vendors(s)
            ]

    keyrings: list[Keyring] = []  # loaded on first use (it may create the key file)

    @app.put("/api/vendors/{vendor_id}", dependencies=[Depends(require_token)])
    async def put_vendor(vendor_id: str, body: VendorRegistration) -> JSONResponse:
        """Register or replace a vendor. `credential` is write-only: stored encrypted, sent to
        this vendor alone, never shown (`hasCredential`). Left out, the stored one is kept
        unless the endpoint changes; `null` drops it."""
        if body.vendor_id != vendor_id:
            return _error(400, "vendorId in the body differs from the path")
        credential = None
        if body.credential is not None:
            try:
                if not keyrings:
                    keyrings.append(Keyring.load(settings.home))
                credential = keyrings[0].encrypt(body.credential)
            except (CredentialError, OSError) as exc:
                log.error("cannot keep vendor credentials: %s", type(exc).__name__)
                return _error(503, f"cannot keep vendor credentials: {exc}")
        clear = "credential" in body.model_fields_set and body.credential is None
        with store.session() as s:
            saved = repo.save_vendor(s, body.to_vendor(credential), clear_credential=clear)
        return JSONResponse(saved.to_json())

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        with store.session() as s:
            counts = repo.count_runs_by_status(s)
        return {"status": "ok", "runs": counts}

    @app.get("/metrics")
    async def prometheus() -> Response:
        with store.session() as s:
            metrics.observe_store(s)
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.include_router(fleet_router(store, require_token, require_read=require_read))
    mount_dashboard(app, settings, store)  # the operator's pages at `/` (procure.web)
    return app
