"""The GPU worker's HTTP service (`procure gpu-worker`): `POST /gpu-check` (and its alias
`/agent-net`) in seed 003's shape, `GET /models`, `GET /metrics` (dcgm-exporter names),
`GET /healthz`, the dead-man lease and the job runner (`/jobs`). Registration with an
orchestrator runs beside it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.bearer import bearer_matches
from procure.gpu import nodestate, registration
from procure.gpu.deadman import DeadMan
from procure.gpu.job_routes import job_router
from procure.gpu.jobs import JobRunner, Limits
from procure.gpu.metrics import exposition
from procure.gpu.ollama import Catalogue, ollama_client, read_catalogue
from procure.gpu.probe import CachedProbe, Probe, nvml_reader, plainly
from procure.gpu.settings import MAX_LEASE_S, GpuWorkerSettings, capability_token
from procure.safetext import show_url
from procure.scrape import ScrapeSettings, scrape_allowed

log = logging.getLogger(__name__)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class CheckRequest(BaseModel):
    # Orchestrators may add their own keys; only agent_id matters (the seed: "arbitrary").
    model_config = ConfigDict(extra="ignore")
    agent_id: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
    ] = Field(strict=True)


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl_s: float = Field(gt=0.1, le=MAX_LEASE_S, allow_inf_nan=False)
    holder: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _unreachable(settings: GpuWorkerSettings, bind_host: str | None, default: str) -> str | None:
    """Why the orchestrator could never reach the capability's default URL, or None: the node
    listens on loopback only (`procure gpu-worker`'s default) and the orchestrator is on another
    machine, so every job it forwarded to `default` would fail while /healthz said "registered"."""
    if settings.capability_url or not _loopback(bind_host) or not settings.orchestrator_url:
        return None
    if _loopback(urlsplit(settings.orchestrator_url).hostname):
        return None  # an orchestrator on this machine may well reach it
    return (
        f"this node listens on {bind_host} only, so the orchestrator at "
        f"{show_url(settings.orchestrator_url)} cannot reach it at {default}: start it with "
        "--host 0.0.0.0 (or an address the orchestrator reaches), or set CAPABILITY_URL to "
        "where the orchestrator reaches this node"
    )


def _default_url(settings: GpuWorkerSettings, bind_host: str | None, host: str, port: int) -> str:
    """Where the orchestrator reaches this node when CAPABILITY_URL is unset: the hostname, but
    for a node on loopback with its orchestrator beside it, the address it listens on (the
    hostname may name another address of this machine: Debian's 127.0.1.1, a private IP)."""
    orchestrator = urlsplit(settings.orchestrator_url or "").hostname
    if bind_host and _loopback(bind_host) and _loopback(orchestrator):
        address = bind_host.strip("[]")
        return f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
    return f"http://{host}:{port}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_gpu_worker_app(
    settings: GpuWorkerSettings,
    *,
    read: Callable[[], Probe] | None = None,
    port: int = 9876,
    hostname: str | None = None,
    bind_host: str | None = None,
    ollama_transport: httpx.AsyncBaseTransport | None = None,
    orchestrator_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The worker. `read` is the NVML boundary (tests pass a fake; default: the real NVML, its
    XID events watched); the transports let tests route Ollama or the orchestrator in-process
    (default: real sockets). `bind_host`, the address the server listens on (None: unknown),
    decides whether the default capability URL can be reached at all."""
    host = hostname or socket.gethostname()
    probe = CachedProbe(
        read or nvml_reader(), settings.nvml_cache_s, timeout_s=settings.nvml_timeout_s
    )
    folder = nodestate.state_dir(settings.checkpoint_dir)  # what outlives a crash of the node
    deadman = DeadMan(
        settings.on_orphan.get_secret_value() if settings.on_orphan else None,
        timeout_s=settings.orphan_action_timeout_s,
        path=folder / "lease.json",
    )
    runner = JobRunner(
        Limits(
            max_running=settings.jobs_max_running,
            keep=settings.jobs_keep,
            log_lines=settings.job_log_lines,
            line_bytes=settings.job_line_bytes,
            cancel_grace_s=settings.job_cancel_grace_s,
            checkpoint_root=settings.checkpoint_dir,
            docker=settings.docker_binary,
            docker_gpus=settings.docker_gpus,
            state_dir=folder,
        )
    )
    state: registration.Registration | None = None
    unreachable: str | None = None
    if settings.orchestrator_url:
        state = registration.Registration(settings.orchestrator_url, settings.capability_name)
        unreachable = _unreachable(settings, bind_host, f"http://{host}:{port}")
        if unreachable is not None:
            state.state, state.last_error = "refused", unreachable

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        found = await probe.get()  # the start-up line says plainly what the node has
        (log.warning if found.gpu_count == 0 else log.info)("GPU node: %s", plainly(found))
        # A previous run that died hard left its jobs running and its lease unwatched.
        await nodestate.end_leftovers(folder)
        deadman.restore()
        async with contextlib.AsyncExitStack() as stack:
            app.state.ollama = None
            if settings.ollama_url:
                app.state.ollama = await stack.enter_async_context(
                    ollama_client(settings.ollama_timeout_s, ollama_transport)
                )
            tasks: list[asyncio.Task[None]] = []
            if deadman.enabled:
                tasks.append(asyncio.create_task(deadman.watch(), name="gpu-deadman"))
            if state is not None and unreachable is not None:
                log.error("capability %s not registered: %s", state.name, unreachable)
            elif state is not None:
                client = await stack.enter_async_context(
                    registration.orchestrator_client(settings, orchestrator_transport)
                )
                tasks.append(asyncio.create_task(_register(client), name="gpu-register"))
            try:
                yield
            finally:
                await runner.close()  # no job outlives the node
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                deadman.release()
                # Once sent, a registration may be held by the orchestrator though no answer said
                # so (still in flight at the stop, or its answer timed out), and once accepted it
                # is held even while a refresh is retried: only a node never heard (or refused)
                # has none to drop. Unregistering an unknown name is harmless; the client's
                # deadline bounds it.
                if state is not None and state.attempts > 0 and state.state != "refused":
                    await _unregister(client)

    async def _register(client: httpx.AsyncClient) -> None:
        assert state is not None
        url = settings.capability_url or _default_url(settings, bind_host, host, port)
        await registration.keep_registered(
            client, settings, registration.capability(settings, url), state
        )

    async def _unregister(client: httpx.AsyncClient) -> None:
        assert state is not None and settings.orchestrator_url
        secret = settings.orchestrator_secret
        if await registration.unregister(
            client,
            settings.orchestrator_url,
            secret.get_secret_value() if secret else "",
            settings.capability_name,
        ):
            state.state = "unregistered"

    app = FastAPI(
        title="procure GPU worker",
        version="0.1.0",
        description="GPU health (NVML), the Ollama model catalogue, dcgm-exporter metrics and the "
        "job runner.",
        lifespan=lifespan,
    )
    app.add_middleware(BoundedRequests)  # outermost: before any parser or authentication

    def require_token(authorization: str | None = Header(None)) -> None:
        if settings.token is None:
            return
        if not bearer_matches(authorization, settings.token.get_secret_value()):
            raise HTTPException(401, "missing or wrong bearer token")

    def require_capability(authorization: str | None = Header(None)) -> None:
        """The node's token, or the capability's (what the orchestrator forwards with)."""
        if settings.token is None:
            return
        node = settings.token.get_secret_value()
        if not bearer_matches(authorization, node) and not bearer_matches(
            authorization, capability_token(node)
        ):
            raise HTTPException(401, "missing or wrong bearer token")

    # Naming the field, never quoting it (NaN or 1e999 could not be rendered: a 500).
    answer_invalid_requests(app, lambda found: _error(422, "invalid request: " + "; ".join(found)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    async def catalogue(request: Request) -> Catalogue | None:
        if request.app.state.ollama is None or not settings.ollama_url:
            return None
        return await read_catalogue(request.app.state.ollama, settings.ollama_url)

    async def gpu_check(body: CheckRequest, request: Request) -> dict[str, Any]:
        figures, models = await asyncio.gather(probe.get(), catalogue(request))
        answer: dict[str, Any] = {"status": "success", "agent_id": body.agent_id}
        if models is not None and models.ok:
            loaded = max(models.loaded, key=lambda m: m["size_vram"], default=None)
            first = loaded or (models.pulled[0] if models.pulled else None)
            answer |= {
                "model_name": first["name"] if first else None,
                "vram_usage_mb": models.vram_mb,
                "total_models": len(models.pulled),
                "source": "ollama",
            }
        else:
            # No Ollama (or it is down): the GPUs themselves say what they hold.
            named = [g for g in figures.gpus if g.name]
            answer |= {
                "model_name": named[0].name if named else None,
                "vram_usage_mb": sum(g.memory_used_mb or 0 for g in figures.gpus),
                "total_models": 0,
                "source": "nvml",
            }
        answer |= {
            "timestamp": time.time(),
            "gpu_count": figures.gpu_count,
            "gpus": [g.to_json() for g in figures.gpus],
            "reason": figures.reason,
            "gpu": plainly(figures),
        }
        if models is not None and not models.ok:
            answer["ollama_error"] = models.error
        return answer

    authed = [Depends(require_token)]
    forwarded = [Depends(require_capability)]
    app.post("/gpu-check", dependencies=forwarded)(gpu_check)
    app.post("/agent-net", dependencies=forwarded)(gpu_check)  # the seed's alias

    @app.get("/models", dependencies=forwarded)
    async def models(request: Request) -> dict[str, Any]:
        found = await catalogue(request)
        if found is None:
            return {
                "status": "not_configured",
                "error": "no Ollama server configured (set OLLAMA_URL)",
                "total_models": 0,
                "models": [],
                "loaded": [],
                "vram_usage_mb": 0,
            }
        return found.to_json()

    scrape_token = ScrapeSettings().metrics_token  # the one /metrics rule: procure.scrape

    @app.get("/metrics")
    async def metrics(authorization: str | None = Header(None)) -> Response:
        if not scrape_allowed(authorization, scrape_token, settings.token):
            raise HTTPException(401, "missing or wrong bearer token")
        body = exposition(await probe.get(), host)
        if deadman.enabled:  # the alert rules' "a node whose lease lapsed"
            lapsed = 1 if deadman.state == "fired" else 0
            name = host.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            body += (
                "# HELP procure_node_lease_lapsed 1 once the dead-man lease lapsed and fired\n"
                "# TYPE procure_node_lease_lapsed gauge\n"
                f'procure_node_lease_lapsed{{Hostname="{name}"}} {lapsed}\n'
            ).encode()
        return Response(body, media_type=PROMETHEUS_TEXT)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        figures = await probe.get()
        return {
            "status": "ok",
            "gpu": plainly(figures),  # healthy as a service; whether it has a GPU, plainly
            "gpu_count": figures.gpu_count,
            "gpus_failing": sum(1 for g in figures.gpus if g.error),
            "reason": figures.reason,
            "ollama": "configured" if settings.ollama_url else "not_configured",
            "registration": state.to_json() if state else {"state": "off"},
            "lease": deadman.to_json(),
        }

    @app.post("/lease", dependencies=authed)
    async def take_lease(body: LeaseRequest) -> dict[str, Any]:
        _lease_allowed()
        return deadman.renew(body.holder, body.ttl_s)

    @app.get("/lease", dependencies=authed)
    async def lease() -> dict[str, Any]:
        return deadman.to_json()

    @app.delete("/lease", dependencies=authed)
    async def disarm() -> dict[str, Any]:
        _lease_allowed()
        return deadman.disarm()

    def _lease_allowed() -> None:
        if not deadman.enabled:
            raise HTTPException(
                409, "the dead-man switch is off: set GPU_WORKER_ON_ORPHAN to enable it"
            )
        if settings.token is None:
            # Anyone who can reach the port could otherwise shut the instance down.
            raise HTTPException(403, "leases need GPU_WORKER_TOKEN to be set")

    def _jobs_allowed() -> None:
        if settings.token is None:
            # Anyone who can reach the port could otherwise run any command on the instance.
            raise HTTPException(403, "jobs need GPU_WORKER_TOKEN to be set")

    app.include_router(job_router(runner, require_token, _jobs_allowed))

    app.state.probe = probe
    app.state.jobs = runner
    app.state.deadman = deadman
    app.state.registration = state
    return app
