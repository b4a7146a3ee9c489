"""The mock Lambda Cloud (`procure mock-cloud`): Lambda's API v1 (same paths, JSON, error
envelope and status names) over `MockCloudState`, each instance running a simulated GPU node,
plus admin endpoints to inject faults, move the clock, submit workloads and read the queue.

Faults (`POST /admin/faults`): refuse for capacity or quota, answer 500 or a `provider/` error,
garbage or a wrongly shaped answer, or hang; per endpoint (`instance-types`, `instances`,
`instance`, `launch`, `terminate`) or all. `POST /admin/instances/{id}/preempt|unhealthy`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.asgibounds import BoundedRequests
from procure.bearer import bearer_matches
from procure.clouds.lambda_cloud.catalogue import region_json
from procure.clouds.lambda_cloud.mockstate import (
    MockCloudConfig,
    MockCloudState,
    MockInstance,
    Refusal,
)
from procure.clouds.lambda_cloud.nodes import Nodes
from procure.sim.workload import JobSpec, WorkloadError, parse_csv, synthetic

log = logging.getLogger(__name__)
STEP_EVERY_S = 0.05  # wall seconds between background steps of the simulation


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    refuse_capacity: bool = False
    refuse_quota: bool = False
    account_inactive: bool = False
    error500: bool = False
    provider_error: bool = False
    garbage: bool = False
    wrong_shape: bool = False
    hang_s: float = Field(0.0, ge=0, le=600)
    endpoints: list[str] = Field(default_factory=list, max_length=10)

    def applies(self, endpoint: str) -> bool:
        return not self.endpoints or endpoint in self.endpoints


class LaunchBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    region_name: str = Field(max_length=100)
    instance_type_name: str = Field(max_length=100)
    ssh_key_names: list[Annotated[str, Field(max_length=200)]] = Field(max_length=10)
    name: str | None = Field(None, max_length=64)
    hostname: str | None = Field(None, max_length=63, pattern=r"^[a-z0-9][0-9a-z-]{0,62}$")
    file_system_names: list[str] = Field(default_factory=list, max_length=10)


class TerminateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instance_ids: list[Annotated[str, Field(max_length=200)]] = Field(max_length=1000)


class ClockBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    advance_s: float = Field(0.0, ge=0, le=365 * 86400)
    speed: float | None = Field(None, ge=0, le=1e6)


class SyntheticBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    hours: float = Field(24.0, gt=0, le=720)
    jobs_per_hour: float = Field(12.0, ge=0, le=10_000)
    bursts: int = Field(2, ge=0, le=100)
    burst_jobs: int = Field(30, ge=0, le=10_000)
    mean_duration_s: float = Field(1800.0, gt=0, le=86_400)


class WorkloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    csv: str | None = Field(None, max_length=900_000)
    synthetic: SyntheticBody | None = None


class CapacityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instance_type: str = Field(max_length=100)
    region: str = Field(max_length=100)
    count: int = Field(ge=0, le=10_000)


def _refusal(r: Refusal) -> JSONResponse:
    return JSONResponse(r.to_json(), status_code=r.status)


def instance_json(inst: MockInstance) -> dict[str, Any]:
    """Lambda's `Instance` object."""
    ready = inst.status in ("active", "unhealthy")
    if inst.ended_at is not None:
        blocked = {
            "available": False,
            "reason_code": "vm-is-terminating",
            "reason_description": "The instance is terminating.",
        }
        actions = dict.fromkeys(("migrate", "rebuild", "restart", "cold_reboot"), blocked)
        actions["terminate"] = blocked
    elif not ready:
        blocked = {
            "available": False,
            "reason_code": "vm-has-not-launched",
            "reason_description": "The instance has not launched yet.",
        }
        actions = dict.fromkeys(("migrate", "rebuild", "restart", "cold_reboot"), blocked)
        actions["terminate"] = {"available": True}
    else:
        actions = {k: {"available": True} for k in ("migrate", "rebuild", "restart")}
        actions |= {k: {"available": True} for k in ("cold_reboot", "terminate")}
    body: dict[str, Any] = {
        "id": inst.id,
        "name": inst.name,
        "status": inst.status,
        "ssh_key_names": inst.ssh_key_names,
        "file_system_names": [],
        "region": region_json(inst.region),
        "instance_type": inst.type.to_json(),
        "actions": actions,
        "tags": [],
        "firewall_rulesets": [],
    }
    if ready and inst.ip:
        # As on Lambda, an instance has its address once it is up.
        hostname = inst.ip.replace(".", "-")
        body |= {
            "ip": inst.ip,
            "private_ip": inst.private_ip,
            "hostname": hostname,
            "jupyter_token": inst.jupyter_token,
            "jupyter_url": f"https://jupyter-{inst.id}.lambdaspaces.com/?token="
            + inst.jupyter_token,
        }
    return body


def create_mock_cloud_app(state: MockCloudState) -> FastAPI:
    config = state.config
    nodes = Nodes(state)
    faults = Faults()

    async def stepper() -> None:
        while True:
            try:
                await asyncio.to_thread(state.step)
                if config.nodes:
                    await nodes.reconcile()
            except Exception:  # the simulation must keep running whatever one step did
                log.exception("mock cloud step failed")
            await asyncio.sleep(STEP_EVERY_S)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(stepper(), name="mock-cloud-step")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await nodes.stop_all()

    app = FastAPI(
        title="procure mock Lambda Cloud",
        version="1.10.0",
        description="Lambda Cloud API v1 on a simulated clock, with simulated GPU nodes.",
        lifespan=lifespan,
    )
    app.add_middleware(BoundedRequests)
    app.state.cloud = state
    app.state.nodes = nodes
    app.state.faults = faults

    def authorised(authorization: str | None = Header(None)) -> None:
        given = authorization or ""
        if given.lower().startswith("basic "):  # Lambda also accepts Basic with `key:`
            with contextlib.suppress(ValueError):
                decoded = base64.b64decode(given[6:].strip()).decode("utf-8", "replace")
                given = "Bearer " + decoded.split(":", 1)[0]
        if not bearer_matches(given, config.api_key):
            raise Refusal(
                401,
                "global/invalid-api-key",
                "API key was invalid, expired, or deleted.",
                "Check your API key or create a new one, then try again.",
            )

    @app.exception_handler(Refusal)
    async def refused(_request: Request, exc: Refusal) -> JSONResponse:
        return _refusal(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        return _refusal(
            Refusal(
                400,
                "global/invalid-parameters",
                f"Invalid request data: {problems}",
                "Check the request body against the API reference.",
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _refusal(
                Refusal(
                    404,
                    "global/not-found",
                    "The requested resource was not found.",
                    "Check the URL.",
                )
            )
        return _refusal(
            Refusal(
                exc.status_code,
                "global/invalid-parameters",
                str(exc.detail),
                "Check the method and URL.",
            )
        )

    async def faulted(endpoint: str, answer: Callable[[], Awaitable[Any]]) -> Response:
        """The endpoint's answer `{"data": ...}`, or the fault injected for it."""
        if faults.applies(endpoint):
            if faults.hang_s:
                await asyncio.sleep(faults.hang_s)
            if faults.account_inactive:
                raise Refusal(
                    403, "global/account-inactive", "Your account is inactive.", "Contact Support."
                )
            if faults.error500:
                raise Refusal(
                    500,
                    "global/internal-error",
                    "An internal server error occurred.",
                    "Try again later. Contact Support if the problem persists.",
                )
            if faults.provider_error:
                raise Refusal(
                    503,
                    "provider/internal-unavailable",
                    "Provider unavailable",
                    "Try again shortly",
                )
            if faults.garbage:
                return PlainTextResponse("<html><body>502 Bad Gateway</body></html>", 200)
            if faults.wrong_shape:
                return JSONResponse({"data": "not what you asked for"})
        return JSONResponse({"data": await answer()})

    authed = [Depends(authorised)]

    @app.get("/api/v1/instance-types", dependencies=authed)
    async def instance_types() -> Response:
        async def answer() -> dict[str, Any]:
            with state.lock:
                state.step()
                return {
                    name: {
                        "instance_type": kind.to_json(),
                        "regions_with_capacity_available": [
                            region_json(r)
                            for r in config.capacity.get(name, {})
                            if state.free_capacity(name, r) > 0
                            and not (faults.refuse_capacity and faults.applies("launch"))
                        ],
                    }
                    for name, kind in config.types.items()
                }

        return await faulted("instance-types", answer)

    @app.get("/api/v1/instances", dependencies=authed)
    async def instances() -> Response:
        async def answer() -> list[dict[str, Any]]:
            with state.lock:
                state.step()
                return [instance_json(i) for i in state.instances.values()]

        return await faulted("instances", answer)

    @app.get("/api/v1/instances/{instance_id}", dependencies=authed)
    async def instance(instance_id: str) -> Response:
        async def answer() -> dict[str, Any]:
            with state.lock:
                state.step()
                inst = state.instances.get(instance_id)
                if inst is None:
                    raise Refusal(
                        404,
                        "global/object-does-not-exist",
                        "Specified instance does not exist.",
                        "Check the id.",
                    )
                return instance_json(inst)

        return await faulted("instance", answer)

    @app.post("/api/v1/instance-operations/launch", dependencies=authed)
    async def launch(body: LaunchBody) -> Response:
        async def answer() -> dict[str, Any]:
            if faults.applies("launch") and faults.refuse_quota:
                raise Refusal(
                    400,
                    "global/quota-exceeded",
                    "Quota exceeded.",
                    "Contact Support to increase your quota.",
                )
            if faults.applies("launch") and faults.refuse_capacity:
                raise Refusal(
                    400,
                    "instance-operations/launch/insufficient-capacity",
                    "Not enough capacity to fulfill launch request.",
                    "Try another region or instance type.",
                )
            instance_id = await asyncio.to_thread(
                state.launch,
                body.instance_type_name,
                body.region_name,
                body.name or "",
                body.ssh_key_names,
            )
            if config.nodes:
                await nodes.reconcile()  # its node starts now, so it answers once active
            return {"instance_ids": [instance_id]}

        return await faulted("launch", answer)

    @app.post("/api/v1/instance-operations/terminate", dependencies=authed)
    async def terminate(body: TerminateBody) -> Response:
        async def answer() -> dict[str, Any]:
            ended = await asyncio.to_thread(state.terminate, body.instance_ids)
            with state.lock:
                return {"terminated_instances": [instance_json(i) for i in ended]}

        return await faulted("terminate", answer)

    # --- admin (not Lambda's API) ----------------------------------------------------------

    @app.get("/admin/queue", dependencies=authed)
    async def queue() -> dict[str, Any]:
        return await asyncio.to_thread(state.figures)

    @app.get("/admin/state", dependencies=authed)
    async def admin_state() -> dict[str, Any]:
        with state.lock:
            now = state.step()
            return {
                "now_s": round(now, 3),
                "speed": state.clock.speed,
                "faults": faults.model_dump(),
                "node_port": config.node_port,
                "instances": [
                    {
                        "id": i.id,
                        "name": i.name,
                        "status": i.status,
                        "ip": i.ip,
                        "busy_gpus": sum(state.cluster.busy(i.id)),
                        "launched_at_s": round(i.launched_at, 3),
                    }
                    for i in state.instances.values()
                ],
            }

    @app.post("/admin/faults", dependencies=authed)
    async def set_faults(body: Faults) -> dict[str, Any]:
        for key, value in body.model_dump().items():
            setattr(faults, key, value)
        return faults.model_dump()

    @app.post("/admin/clock", dependencies=authed)
    async def set_clock(body: ClockBody) -> dict[str, Any]:
        if body.speed is not None:
            state.clock.set_speed(body.speed)
        if body.advance_s:
            state.clock.advance(body.advance_s)
        now = await asyncio.to_thread(state.step)
        return {"now_s": round(now, 3), "speed": state.clock.speed}

    @app.post("/admin/workload", dependencies=authed)
    async def add_workload(body: WorkloadBody) -> dict[str, Any]:
        try:
            jobs = _jobs(body)
            with state.lock:
                now = state.step()
                added = state.cluster.submit(jobs, now)
        except (WorkloadError, ValueError) as exc:
            raise Refusal(
                400,
                "global/invalid-parameters",
                str(exc)[:500],
                "Send csv (submit_s,gpus,duration_s) or synthetic.",
            ) from None
        return {"jobs": added, "offset_s": round(now, 3)}

    @app.post("/admin/capacity", dependencies=authed)
    async def set_capacity(body: CapacityBody) -> dict[str, Any]:
        with state.lock:
            config.capacity.setdefault(body.instance_type, {})[body.region] = body.count
            return {"capacity": config.capacity}

    @app.post("/admin/instances/{instance_id}/{fault}", dependencies=authed)
    async def instance_fault(instance_id: str, fault: str) -> dict[str, Any]:
        if fault not in ("preempt", "unhealthy"):
            raise Refusal(404, "global/not-found", "No such fault.", "preempt or unhealthy")
        act = state.preempt if fault == "preempt" else state.make_unhealthy
        inst = await asyncio.to_thread(act, instance_id)
        if config.nodes and fault == "preempt":
            await nodes.reconcile()
        with state.lock:
            return instance_json(inst)

    return app


def _jobs(body: WorkloadBody) -> list[JobSpec]:
    if (body.csv is None) == (body.synthetic is None):
        raise WorkloadError("send exactly one of csv or synthetic")
    if body.csv is not None:
        return parse_csv(body.csv)
    assert body.synthetic is not None
    s = body.synthetic
    return synthetic(
        s.seed,
        hours=s.hours,
        jobs_per_hour=s.jobs_per_hour,
        bursts=s.bursts,
        burst_jobs=s.burst_jobs,
        mean_duration_s=s.mean_duration_s,
    )


@dataclass
class MockCloud:
    """A mock cloud served on loopback (in-process: tests, demos, the benchmark)."""

    url: str
    state: MockCloudState
    server: Any  # procure.local.LocalServer

    @property
    def api_key(self) -> str:
        return self.state.config.api_key

    def figures(self) -> dict[str, Any]:
        return self.state.figures()

    def stop(self) -> None:
        self.server.stop()


def start_mock_cloud(config: MockCloudConfig | None = None, port: int | None = None) -> MockCloud:
    """Serve a mock cloud on 127.0.0.1 (a free port unless given) in a background thread; its
    nodes' dead-man switches call back to it."""
    from procure.local import free_port, serve

    config = config or MockCloudConfig()
    port = port or free_port()
    config.api_url = config.api_url or f"http://127.0.0.1:{port}"
    state = MockCloudState(config)
    server = serve(create_mock_cloud_app(state), port)
    return MockCloud(server.url, state, server)
