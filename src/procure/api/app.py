"""The FastAPI app: its factory and lifespan (the agent's loop and worker, the fleet), error
envelopes, the token checks, and one router per resource (runs, vendors, fleet, nodes, ops) plus
the dashboard's pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import ValidationError

from procure.agent.runtime import make_deps
from procure.agent.tick import AgentDeps
from procure.agent.upkeep import prune, settle_and_prune
from procure.agent.worker import WorkerConfig
from procure.api import errors
from procure.api.cloud_vendors import cloud_vendors_router
from procure.api.docs import mount_docs
from procure.api.fleet import fleet_router
from procure.api.hosts import DirectHostsOnly
from procure.api.nodes import nodes_router
from procure.api.offers import offers_router
from procure.api.ops import ops_router
from procure.api.runs import runs_router
from procure.api.spend import spend_router
from procure.api.vendors import vendors_router
from procure.bearer import bearer_matches
from procure.fleet.inprocess import FleetRun, fleet_in_server
from procure.fleet.settings import FleetSettings
from procure.loopthread import AgentLoop, LoopThread
from procure.settings import Settings
from procure.store import Store
from procure.web import mount_dashboard
from procure.web.cloud_vendor_pages import cloud_vendor_pages
from procure.web.offers_pages import offers_pages
from procure.web.settings import WebSettings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    store: Store,
    *,
    deps_factory: Callable[[], AgentDeps] | None = None,
    worker: WorkerConfig | None = None,
    fleet: FleetRun | None = None,
    budget_warnings: bool = True,
    upkeep: WorkerConfig | None = None,
) -> FastAPI:
    """The API over `store`.

    The agent runs on an event loop of its own, in a dedicated thread (`AgentLoop`): the
    in-process worker, and every tick the API (`POST /api/agent-tick`, cancel) or the dashboard
    asks for, so that their synchronous store calls never stall this loop's pages, SSE streams
    and health checks. Its deps are built there by `deps_factory` (default: `make_deps` from the
    settings), called on the agent's loop because their httpx clients belong to the loop that
    uses them, and closed there on shutdown. A test that wants its own deps passes a factory
    (e.g. one returning `make_deps(...)` with another planner), never deps already in use on
    another loop.

    With `worker`, a worker runs on the agent's loop for the app's lifetime, so runs advance
    without anyone calling the tick endpoint (`procure serve` does this by default). With
    `fleet`, the fleet controller runs too, on a loop and thread of its own
    (`procure serve --fleet`), and the Fleet and Nodes pages read with its settings.

    While the app runs: `app.state.agent` (the AgentLoop), `app.state.deps` (its deps: await
    their clients only through `app.state.agent.call`), `app.state.worker` (the Worker, or None),
    `app.state.fleet` (the controller's FleetContext, or None). With `budget_warnings` (the default)
    the budgets are swept for warnings before their caps (`fleet.cap_warnings`).

    Without `worker`, the app does the worker's upkeep itself (retention of the tick log, the
    running totals folded, payments in doubt on ended runs settled), on the agent's loop, every
    `upkeep.settle_every_s` (`upkeep`: a WorkerConfig, its defaults if None)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        agent = AgentLoop(deps_factory or (lambda: make_deps(settings, store)), worker=worker)
        app.state.agent = agent
        app.state.deps = await agent.start()
        app.state.worker = agent.worker
        app.state.fleet = None
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(agent.stop)  # last out: the worker drains, deps close
            if worker is None:
                # No worker here (`serve --no-worker`, runs ticked through the API as in the
                # seeds): nothing else pruned the tick log each API tick adds to, folded the
                # totals every page sums, or settled an ended run's payment in doubt (pending,
                # its budget held, for ever). Beside separate workers doing the same it is
                # harmless: each pass works in bounded batches, and a settlement is recorded once.
                upkeep_task = asyncio.create_task(
                    agent.call(_upkeep_alone(store, upkeep or WorkerConfig()))
                )
                stack.push_async_callback(_cancelled, upkeep_task)
            if fleet is not None:
                run = fleet
                controller = LoopThread(
                    lambda: fleet_in_server(store, run, background), name="procure-fleet"
                )
                app.state.fleet = await controller.start()
                stack.push_async_callback(controller.stop)
            # Warnings before caps: swept off the loop (store calls in a thread), delivered
            # through the outbox; one per budget and period.
            from procure.fleet import cap_warnings

            if not budget_warnings:  # a test that sweeps by hand with its own thresholds
                yield
                return
            # Without the fleet, no outbox loop writes the warnings' audit entries: this one
            # does, where the fleet would (LAMBDA_LABS_AUDIT_LOG).
            audit = None if fleet is not None else _audit_log()
            warn = asyncio.create_task(
                cap_warnings.run_warnings(
                    store, fleet=fleet.cfg if fleet else None, audit_log=audit
                ),
                name="procure-warnings",
            )
            background["budget-warnings"] = "running"

            async def stop_warnings() -> None:
                warn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await warn

            stack.push_async_callback(stop_warnings)
            yield

    app = FastAPI(
        title="procure",
        version="0.1.0",
        description="Rents GPU compute for a goal within a hard budget, paying over x402.",
        lifespan=lifespan,
        docs_url=None,  # mount_docs: Swagger UI from the package, not a CDN
        # No ReDoc: its page runs a script from a CDN on this origin (the dashboard's cookie)
        redoc_url=None,
    )

    errors.install(app)  # bounds outermost: before any parser or authentication
    if settings.api_token is None:  # open: only to loopback and IP addresses (DNS rebinding)
        app.add_middleware(DirectHostsOnly)
    background: dict[str, str] = {}  # background tasks' states, for /healthz
    app.state.background = background

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

    app.include_router(runs_router(settings, store, require_token, require_read))
    app.include_router(vendors_router(settings, store, require_token, require_read))
    app.include_router(cloud_vendors_router(store, require_token))  # POST /api/vendors/cloud
    app.include_router(spend_router(store, require_read))
    fleet_cfg = fleet.cfg if fleet is not None else None  # else each reads the environment's
    app.include_router(fleet_router(store, require_token, fleet_cfg, require_read=require_read))
    app.include_router(nodes_router(store, require_read, fleet_cfg))
    app.include_router(ops_router(store, background, settings))
    app.include_router(offers_router(store, require_read))
    mount_dashboard(app, settings, store, fleet_cfg=fleet_cfg)  # the pages at `/` (procure.web)
    app.include_router(offers_pages(settings, store))  # /offers
    app.include_router(cloud_vendor_pages(settings, store))  # /vendors/cloud/new
    mount_docs(app)
    return app


def _upkeep_alone(
    store: Store, cfg: WorkerConfig
) -> Callable[[AgentDeps], Coroutine[Any, Any, None]]:
    """The worker's upkeep for an app without one (`upkeep.settle_and_prune`, the retention
    pass keeping its trim mark between passes as the worker does): run it with `agent.call`."""
    mark: int | None = None

    def prune_pass() -> int:
        nonlocal mark
        deleted, mark = prune(store, cfg, mark)
        return deleted

    return lambda deps: settle_and_prune(deps, cfg.settle_every_s, prune_pass)


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _audit_log() -> Path:
    """Where the fleet writes its audit log (LAMBDA_LABS_AUDIT_LOG); its default where the
    fleet's settings do not validate (they are not this server's to refuse)."""
    try:
        return Path(FleetSettings().audit_log)
    except ValidationError:
        return Path(FleetSettings.model_fields["audit_log"].default)
