"""The mock Lambda Cloud (`procure mock-cloud`): Lambda's API v1 (same paths, auth schemes, JSON,
error envelope and status names; request bodies checked against Lambda's spec) over
`MockCloudState`, each instance running a simulated GPU node, plus the admin API of
`mockadmin` (faults, clock, capacity, preemption, billing by Lambda's rule, workloads).
Faults are described in `mockfaults.Faults`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.clouds.lambda_cloud.catalogue import region_json
from procure.clouds.lambda_cloud.mockadmin import admin_router
from procure.clouds.lambda_cloud.mockfaults import (
    WRONG_IP,
    Bucket,
    Faults,
    LambdaEnvelope,
    faulted,
    invalid,
    key_matches,
    refusal_for,
    spec_body,
)
from procure.clouds.lambda_cloud.mockkeys import keys_router
from procure.clouds.lambda_cloud.mocknet import net_router
from procure.clouds.lambda_cloud.mockstate import (
    MockCloudConfig,
    MockCloudState,
    MockInstance,
    Refusal,
)
from procure.clouds.lambda_cloud.nodes import env_from_user_data, node_keeper
from procure.clouds.mockworld import server as mockserver

LAUNCH_PATH = "/api/v1/instance-operations/launch"
TERMINATE_PATH = "/api/v1/instance-operations/terminate"


class TagBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: str = Field(max_length=55, pattern=r"^[a-z][a-z0-9-:]+$")
    value: str = Field(max_length=128)


class LaunchBody(BaseModel):
    """What the mock reads of a launch (already checked against Lambda's spec)."""

    model_config = ConfigDict(extra="ignore")
    region_name: str = Field(max_length=100)
    instance_type_name: str = Field(max_length=100)
    ssh_key_names: list[Annotated[str, Field(max_length=200)]] = Field(max_length=10)
    name: str | None = Field(None, max_length=64)
    hostname: str | None = Field(None, max_length=63, pattern=r"^[a-z0-9][0-9a-z-]{0,62}$")
    file_system_names: list[str] = Field(default_factory=list, max_length=10)
    user_data: str | None = Field(None, max_length=1024 * 1024)  # Lambda's 1 MB
    tags: list[TagBody] = Field(default_factory=list, max_length=50)


class TerminateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    instance_ids: list[Annotated[str, Field(max_length=200)]] = Field(max_length=1000)


def _refusal(r: Refusal) -> JSONResponse:
    return JSONResponse(r.to_json(), status_code=r.status)


def instance_json(inst: MockInstance, faults: Faults | None = None) -> dict[str, Any]:
    """Lambda's `Instance` object (as `faults` may distort it: an unknown status, a wrong ip)."""
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
        "instance_type": inst.type.to_json(inst.price_cents),
        "actions": actions,
        "tags": [dict(t) for t in inst.tags],
        "firewall_rulesets": [],
    }
    if ready and inst.ip:
        # As on Lambda, an instance has its address once it is up.
        ip = WRONG_IP if faults and faults.wrong_ip else inst.ip
        body |= {
            "ip": ip,
            "private_ip": inst.private_ip,
            "hostname": ip.replace(".", "-"),
            "jupyter_token": inst.jupyter_token,
            "jupyter_url": f"https://jupyter-{inst.id}.lambdaspaces.com/?token="
            + inst.jupyter_token,
        }
    if faults and faults.unknown_status:
        body["status"] = "hibernating"  # no such InstanceStatus
    return body


def create_mock_cloud_app(state: MockCloudState) -> FastAPI:
    config = state.config
    nodes = node_keeper(state)
    faults = Faults()

    app = FastAPI(
        title="procure mock Lambda Cloud",
        version="1.10.0",
        description="Lambda Cloud API v1 on a simulated clock, with simulated GPU nodes.",
        lifespan=mockserver.stepping(
            "mock Lambda Cloud", nodes, with_nodes=config.nodes, world_step=state.step
        ),
    )
    app.add_middleware(BoundedRequests, max_bytes=2 << 20)  # a launch carries up to 1 MB
    app.add_middleware(LambdaEnvelope)  # outermost: the bounds' refusals in Lambda's envelope
    app.state.cloud = state
    app.state.nodes = nodes
    app.state.faults = faults

    def authorised(authorization: str | None = Header(None)) -> None:
        if not key_matches(authorization, config.api_key):
            raise refusal_for(401)

    requests = Bucket(config.request_interval_s, config.request_burst)
    launches = Bucket(config.launch_interval_s, config.launch_burst)

    def paced(request: Request) -> None:
        """Lambda's rate limits, when the config turns them on."""
        if not config.rate_limit:
            return
        if not requests.take() or (request.url.path == LAUNCH_PATH and not launches.take()):
            raise refusal_for(429)

    @app.exception_handler(Refusal)
    async def refused(_request: Request, exc: Refusal) -> JSONResponse:
        return _refusal(exc)

    # In Lambda's envelope, naming the field, never quoting it (NaN could not be rendered).
    answer_invalid_requests(app, lambda found: _refusal(invalid("; ".join(found[:5]))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _refusal(refusal_for(404))
        return _refusal(
            Refusal(
                exc.status_code,
                "global/invalid-parameters",
                str(exc.detail),
                "Check the method and URL.",
            )
        )

    def shown(inst: MockInstance, endpoint: str) -> dict[str, Any]:
        return instance_json(inst, faults if faults.applies(endpoint) else None)

    authed = [Depends(authorised)]
    api = [Depends(authorised), Depends(paced)]

    @app.get("/api/v1/instance-types", dependencies=api)
    async def instance_types() -> Response:
        async def answer() -> dict[str, Any]:
            with state.lock:
                now = state.step()
                return {
                    name: {
                        "instance_type": kind.to_json(state.price_cents(name, now)),
                        "regions_with_capacity_available": [
                            region_json(r)
                            for r in config.capacity.get(name, {})
                            if state.free_capacity(name, r) > 0
                            and not (faults.refuse_capacity and faults.applies("launch"))
                        ],
                    }
                    for name, kind in config.types.items()
                }

        return await faulted(faults, "instance-types", answer)

    @app.get("/api/v1/instances", dependencies=api)
    async def instances() -> Response:
        async def answer() -> list[dict[str, Any]]:
            with state.lock:
                state.step()
                return [shown(i, "instances") for i in state.instances.values()]

        return await faulted(faults, "instances", answer)

    @app.get("/api/v1/instances/{instance_id}", dependencies=api)
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
                return shown(inst, "instance")

        return await faulted(faults, "instance", answer)

    @app.post(LAUNCH_PATH, dependencies=api)
    async def launch(request: Request) -> Response:
        body = await spec_body(request, LAUNCH_PATH, LaunchBody)

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
            token = env_from_user_data(body.user_data).get("GPU_WORKER_TOKEN") or None
            instance_id = await asyncio.to_thread(
                lambda: state.launch(
                    body.instance_type_name,
                    body.region_name,
                    body.name or "",
                    body.ssh_key_names,
                    tags=[t.model_dump() for t in body.tags],
                    node_token=token,
                )
            )
            if config.nodes:
                await nodes.reconcile()  # its node starts now, so it answers once active
            return {"instance_ids": [instance_id]}

        return await faulted(faults, "launch", answer)

    @app.post(TERMINATE_PATH, dependencies=api)
    async def terminate(request: Request) -> Response:
        body = await spec_body(request, TERMINATE_PATH, TerminateBody)

        async def answer() -> dict[str, Any]:
            ended = await asyncio.to_thread(state.terminate, body.instance_ids)
            if config.nodes:
                await nodes.reconcile()  # a terminated instance's node stops now
            with state.lock:
                return {"terminated_instances": [shown(i, "terminate") for i in ended]}

        return await faulted(faults, "terminate", answer)

    app.include_router(keys_router(state, faults, api))
    app.include_router(net_router(state, faults, api))  # firewall rules, images
    app.include_router(admin_router(state, nodes, faults, instance_json), dependencies=authed)
    return app


create_app = create_mock_cloud_app  # the name the three mocks share


class MockCloud(mockserver.MockCloud[MockCloudState]):
    """A mock Lambda Cloud served on loopback (in-process: tests, demos, the benchmark)."""

    def figures(self) -> dict[str, Any]:
        return self.state.figures()


def start_mock_cloud(config: MockCloudConfig | None = None, port: int | None = None) -> MockCloud:
    """Serve a mock cloud on 127.0.0.1 (a free port unless given) in a background thread; its
    nodes' dead-man switches call back to it."""
    from procure.local import free_port

    config = config or MockCloudConfig()
    port = port or free_port()
    config.api_url = config.api_url or f"http://127.0.0.1:{port}"
    state = MockCloudState(config)
    server = mockserver.start_app(create_mock_cloud_app(state), port)
    return MockCloud(server.url, state, server)
