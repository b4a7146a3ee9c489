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

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

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
from procure.api.schemas import StartRequest, TickRequest
from procure.asgibounds import BoundedRequests
from procure.models import Vendor, usd_to_micros, utcnow
from procure.settings import Settings
from procure.store import Store, repo

TICK_LEASE_S = 120.0
log = logging.getLogger(__name__)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def create_app(
    settings: Settings,
    store: Store,
    *,
    deps: AgentDeps | None = None,
    worker: WorkerConfig | None = None,
) -> FastAPI:
    """The API over `store`. `deps` may be given (tests, in-process vendors); else built.
    With `worker`, a worker runs in the server's event loop for the app's lifetime, so runs
    advance without anyone calling the tick endpoint (`procure serve` does this by default)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = deps is None
        app.state.deps = deps or make_deps(settings, store)
        app.state.worker = None
        async with contextlib.AsyncExitStack() as stack:
            if worker is not None:
                await stack.enter_async_context(_run_worker(app, worker))
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

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()
        ]
        return _error(422, "invalid request: " + "; ".join(problems), details=problems)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.post("/api/agent-start", status_code=201, dependencies=[Depends(require_token)])
    async def agent_start(body: StartRequest) -> dict[str, Any]:
        with store.session() as s:
            run = repo.create_run(
                s,
                user_id=body.user_id,
                goal=body.goal,
                budget_total=usd_to_micros(body.budget_total),
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
                    request.app.state.deps, body.run_id, owner, TICK_LEASE_S
                )
        except RunNotFound:
            return _error(404, f"run {body.run_id} not found")
        except LeaseHeld as exc:
            return _error(409, f"{exc}; try again", holder=exc.holder)
        metrics.TICKS.labels(result.message.split(" (")[0]).inc()
        return JSONResponse(result.to_json())

    @app.get("/api/agent-status")
    async def agent_status(run_id: str = Query(alias="runId", min_length=1)) -> dict[str, Any]:
        with store.session() as s:
            state = repo.load_state(s, run_id)
        if state is None:
            raise HTTPException(404, f"run {run_id} not found")
        return state.to_json()

    @app.get("/api/runs")
    async def runs(limit: int = Query(50, ge=1, le=500), status: str | None = None) -> list[Any]:
        with store.session() as s:
            return [r.to_json() for r in repo.list_runs(s, limit=limit, status=status)]

    @app.get("/api/runs/{run_id}")
    async def run_detail(run_id: str) -> dict[str, Any]:
        return await agent_status(run_id)

    @app.get("/api/vendors")
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

    @app.put("/api/vendors/{vendor_id}", dependencies=[Depends(require_token)])
    async def put_vendor(vendor_id: str, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        try:
            vendor = Vendor.from_wire(body)
        except ValidationError as exc:
            raise HTTPException(422, f"invalid vendor: {exc.errors()[0]['msg']}") from exc
        if vendor.vendor_id != vendor_id:
            raise HTTPException(400, "vendorId in the body differs from the path")
        with store.session() as s:
            return repo.save_vendor(s, vendor).to_json()

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

    return app
