"""The mock RunPod (`procure mock-cloud --provider runpod`): RunPod REST v2's pod, catalog and
billing paths with its Bearer auth, problem+json errors, RateLimit headers and 429s, createPod's
422 for bodies the spec refuses, over `MockRunPodState`; each pod runs a real GPU node. Admin
paths (the mocks' common design): /admin/state, /admin/clock, /admin/faults, /admin/capacity,
/admin/billing, /admin/instances/{id}/preempt|unhealthy.

Fields the live API accepts but the spec copy does not (dstack's `entrypoint`, `cmd`, ...) are
refused with 422, as the spec's `unevaluatedProperties: false` says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import cache
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from jsonschema import Draft202012Validator
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.bearer import bearer_matches
from procure.clouds.mockworld import faults as mockfaults
from procure.clouds.mockworld import server as mockserver
from procure.clouds.mockworld.faults import AnswerFaults
from procure.clouds.runpod.catalogue import CUDA, DATA_CENTERS, gpu_type_json, level
from procure.clouds.runpod.mockbilling import pod_billing
from procure.clouds.runpod.mockstate import MockPod, MockRunPodState, Problem, RunPodMockConfig
from procure.clouds.runpod.nodes import node_keeper
from procure.clouds.runpod.wire import node_port_of
from procure.clouds.specs import request_schema, spec

PROBLEM = "application/problem+json"
ENDPOINTS = ("catalog", "pods", "pod", "create", "delete", "billing", "keys")
KEYS_PATH = "/v2/account/ssh-keys"  # dstack registers its key here before it creates a pod


class Faults(AnswerFaults):
    """What the next answers of the provider's paths (ENDPOINTS) do instead of the right thing:
    `status` in problem+json; `huge` is 3 MB; never-booting pods stay PROVISIONING."""

    retry_after_s: int | None = Field(2, ge=0, le=86_400)  # with status 429; None: no header


class CapacityBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    gpu: str = Field(max_length=200, validation_alias=AliasChoices("gpu", "instance_type"))
    data_center: str = Field(
        max_length=100, validation_alias=AliasChoices("dataCenterId", "region")
    )
    count: int = Field(ge=0, le=10_000)


@cache
def _request_validator(method: str, path: str) -> Draft202012Validator:
    registry = Registry().with_resource("urn:runpod", DRAFT202012.create_resource(spec("runpod")))
    return Draft202012Validator(request_schema("runpod", method, path), registry=registry)


def spec_errors(body: Any, method: str = "POST", path: str = "/v2/pods") -> list[str]:
    """A request body's contract violations (createPod's by default), as RunPod lists them in
    a 422's `errors`."""
    found = []
    for error in _request_validator(method, path).iter_errors(body):
        where = "$" + "".join(f".{p}" for p in error.absolute_path)
        found.append(f"{where}: {error.message[:200]}")
    return found[:20]


def pod_json(state: MockRunPodState, pod: MockPod, faults: Faults) -> dict[str, Any]:
    """RunPod's `Pod` object."""
    now = state.now()
    status = pod.status
    if status == "RUNNING" and state.config.nodes and pod.ip is None:
        status = "STARTING"  # its node is not listening yet
    actions = {
        "EXITED": ["start", "terminate"],
        "ERROR": ["terminate"],
        "TERMINATED": [],
    }.get(status, ["stop", "restart", "terminate"])
    runtime = None
    if status == "RUNNING":
        node_private = node_port_of(pod.ports, state.config.node_port)
        ports = []
        for entry in pod.ports:
            number, _, proto = entry.partition("/")
            if not number.isdecimal():
                continue
            if proto == "tcp" and int(number) == node_private:
                ip = "127.0.0.1" if faults.wrong_ip else pod.ip
                ports.append(
                    {"private": int(number), "public": state.config.node_port, "type": "tcp"}
                    | {"ip": ip}
                )
            else:
                ports.append({"private": int(number), "public": None, "type": proto, "ip": None})
        runtime = {
            "uptime": int(now - (pod.running_at or now)),
            "gpus": [{"util": 0, "memoryUtil": 0} for _ in range(pod.count)],
            "ports": ports,
        }
    return {
        "id": pod.id,
        "name": pod.name,
        "status": "MIGRATING" if faults.unknown_status else status,
        "actions": actions,
        "image": pod.image,
        "args": pod.args,
        "disk": pod.disk,
        "mounts": {},
        "ports": pod.ports,
        "env": pod.env,
        "registry": None,
        "gpu": {"id": pod.kind.id, "count": pod.count},
        "cloud": pod.cloud,
        "dataCenterId": pod.dc,
        "cudaVersion": CUDA,
        "ssh": {
            "proxy": {
                "host": "ssh.runpod.io",
                "port": 22,
                "username": f"{pod.id}-64411eb2",
                "command": f"ssh {pod.id}-64411eb2@ssh.runpod.io",
            },
            "direct": None,
        },
        "template": None,
        "cost": 0.0 if status in ("EXITED", "TERMINATED") else pod.cost,
        "locked": False,
        "globalNetworking": {"enabled": False},
        "runtime": runtime,
        "createdAt": state.iso(pod.created_at),
        "startedAt": state.iso(pod.running_at) if status == "RUNNING" and pod.running_at else None,
    }


def _problem(exc: Problem) -> JSONResponse:
    return JSONResponse(
        exc.to_json(), status_code=exc.status, media_type=PROBLEM, headers=exc.headers
    )


def create_app(state: MockRunPodState) -> FastAPI:
    config = state.config
    nodes = node_keeper(state)
    faults = Faults()

    lifespan = mockserver.stepping(
        "mock RunPod", nodes, with_nodes=config.nodes, world_step=state.step
    )
    app = FastAPI(title="procure mock RunPod", version="2", lifespan=lifespan)
    app.add_middleware(BoundedRequests)
    # As RunPod answers a body against its contract: a 422 listing the problems (never
    # quoting the input: FastAPI's own answer could not render NaN, a 500).
    answer_invalid_requests(
        app, lambda found: _problem(Problem(422, "Request validation failed.", errors=found))
    )
    app.state.cloud, app.state.nodes, app.state.faults = state, nodes, faults

    def authorised(authorization: str | None = Header(None)) -> None:
        if not authorization:
            raise Problem(401, "missing bearer token")
        if not bearer_matches(authorization, config.api_key):
            raise Problem(401, "invalid bearer token")

    @app.exception_handler(Problem)
    async def problem(_request: Request, exc: Problem) -> JSONResponse:
        return _problem(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return _problem(Problem(405, "The requested method is not allowed for this path."))
        return _problem(Problem(exc.status_code, "resource not found"))

    async def guard(endpoint: str) -> dict[str, str]:
        """Count the request against the rate limits, then play any fault injected for it.
        Returns the RateLimit headers every authenticated answer carries."""
        headers = state.admit()
        if not faults.applies(endpoint) or not faults.answering():
            return headers
        f = faults.serve()
        if f.hang_s:
            await asyncio.sleep(f.hang_s)
        if f.status:
            extra = dict(headers)
            if f.status == 429 and f.retry_after_s is not None:
                extra["Retry-After"] = str(f.retry_after_s)
            raise Problem(f.status, _fault_detail(f.status), headers=extra)
        if f.garbage:
            raise _Raw(mockfaults.garbage())
        if f.huge:
            raise _Raw(mockfaults.huge("pods", 3 << 20))
        return headers

    @app.exception_handler(_Raw)
    async def raw(_request: Request, exc: _Raw) -> Response:
        return exc.response

    authed = [Depends(authorised)]

    @app.get("/v2/catalog/gpus", dependencies=authed)
    async def gpus(request: Request) -> JSONResponse:
        headers = await guard("catalog")
        query = request.query_params
        include = [v for v in query.get("include", "").split(",") if v]
        product = [v for v in query.get("product", "").split(",") if v]
        if bool(include) != bool(product):
            raise Problem(400, "product is required with include=AVAILABILITY, and only with it")
        cloud = query.get("cloud", "SECURE")
        count = query.get("count", "1")
        if cloud not in ("SECURE", "COMMUNITY") or not count.isdecimal() or int(count) < 1:
            raise Problem(422, "invalid query parameters", errors=["cloud or count is invalid"])
        with state.lock:
            now = state.step()
            answer = []
            for kind in config.gpus.values():
                prices = {c: state.price(kind, c, now) for c in ("SECURE", "COMMUNITY")}
                item = gpu_type_json(kind, prices)
                if include:
                    # No machine holds more than maxCount GPUs: no data centre offers pods of
                    # more, and RunPod then omits dataCenters altogether.
                    fits = int(count) <= kind.most(cloud)
                    dcs = [
                        {
                            "id": dc,
                            "name": DATA_CENTERS.get(dc, dc),
                            "availability": level(state.free(kind.id, dc) // int(count)),
                        }
                        for dc in (config.capacity.get(kind.id, {}) if fits else {})
                    ]
                    best = max((d["availability"] for d in dcs), key=_rank, default="NONE")
                    item |= {
                        "availability": best,
                        "cudaVersions": [{"version": CUDA, "available": best != "NONE"}],
                    }
                    if dcs:
                        item["dataCenters"] = dcs
                answer.append(item)
        return JSONResponse({"gpus": answer}, headers=headers)

    @app.get("/v2/pods", dependencies=authed)
    async def list_pods() -> JSONResponse:
        headers = await guard("pods")
        with state.lock:
            state.step()
            pods = [pod_json(state, p, faults) for p in state.pods.values() if not p.deleted]
        return JSONResponse({"pods": pods}, headers=headers)

    @app.post("/v2/pods", dependencies=authed)
    async def create_pod(request: Request) -> JSONResponse:
        headers = await guard("create")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise Problem(400, "request body is not valid JSON", headers=headers) from None
        errors = spec_errors(body)
        if errors:
            raise Problem(422, "Request validation failed.", errors=errors, headers=headers)
        try:
            pod = await asyncio.to_thread(state.create, body, faults.never_boot)
        except Problem as exc:
            exc.headers = headers | exc.headers
            raise
        if config.nodes:
            await nodes.reconcile()
        with state.lock:
            return JSONResponse(pod_json(state, pod, faults), status_code=201, headers=headers)

    @app.get("/v2/pods/{pod_id}", dependencies=authed)
    async def get_pod(pod_id: str) -> JSONResponse:
        headers = await guard("pod")
        with state.lock:
            state.step()
            try:
                return JSONResponse(pod_json(state, state.visible(pod_id), faults), headers=headers)
            except Problem as exc:
                exc.headers = headers
                raise

    @app.delete("/v2/pods/{pod_id}", dependencies=authed)
    async def delete_pod(pod_id: str) -> Response:
        headers = await guard("delete")
        try:
            await asyncio.to_thread(state.delete, pod_id)
        except Problem as exc:
            exc.headers = headers
            raise
        if config.nodes:
            await nodes.reconcile()
        return Response(status_code=204, headers=headers)

    @app.get(KEYS_PATH, dependencies=authed)
    async def ssh_keys() -> JSONResponse:
        headers = await guard("keys")
        with state.lock:
            return JSONResponse({"keys": list(state.ssh_keys)}, headers=headers)

    @app.put(KEYS_PATH, dependencies=authed)
    async def replace_ssh_keys(request: Request) -> JSONResponse:
        """The account's whole key set, replaced (RunPod merges nothing)."""
        headers = await guard("keys")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise Problem(400, "request body is not valid JSON", headers=headers) from None
        errors = spec_errors(body, "PUT", KEYS_PATH)
        if errors:
            raise Problem(422, "Request validation failed.", errors=errors, headers=headers)
        with state.lock:
            state.ssh_keys = list(body["keys"])
            return JSONResponse({"keys": list(state.ssh_keys)}, headers=headers)

    @app.get("/v2/billing/pods", dependencies=authed)
    async def billing_pods(request: Request) -> JSONResponse:
        headers = await guard("billing")
        with state.lock:
            state.step()
            return JSONResponse(pod_billing(state, request.query_params), headers=headers)

    # --- admin (not RunPod's API) ----------------------------------------------------------

    @app.get("/admin/state", dependencies=authed)
    async def admin_state() -> dict[str, Any]:
        with state.lock:
            now = state.step()
            return {
                "now_s": round(now, 3),
                "speed": state.clock.speed,
                "faults": faults.model_dump(),
                "node_port": config.node_port,
                "launches": state.launches,
                "instances": [
                    {
                        "id": p.id,
                        "name": p.name,
                        "status": p.status,
                        "ip": p.ip,
                        "node": f"http://{p.ip}:{config.node_port}" if p.ip else None,
                        "gpu": p.kind.id,
                        "count": p.count,
                        "dataCenterId": p.dc,
                        "cost": p.cost,
                        "billedMicroUsd": state.billed(p, now),
                    }
                    for p in state.pods.values()
                ],
            }

    @app.post("/admin/faults", dependencies=authed)
    async def set_faults(body: Faults) -> dict[str, Any]:
        faults.replace(body)
        return faults.model_dump()

    @app.post("/admin/capacity", dependencies=authed)
    async def set_capacity(body: CapacityBody) -> dict[str, Any]:
        with state.lock:
            config.capacity.setdefault(body.gpu, {})[body.data_center] = body.count
            return {"capacity": config.capacity}

    async def settle() -> float:
        return await asyncio.to_thread(state.step)

    def instance_fault(act: Callable[[str], MockPod]) -> mockserver.InstanceFault:
        async def apply(pod_id: str) -> dict[str, Any]:
            pod = await asyncio.to_thread(act, pod_id)
            if config.nodes:
                await nodes.reconcile()
            with state.lock:
                return pod_json(state, pod, Faults())

        return apply

    admin = mockserver.admin_router(
        clock=state.clock,
        settle=settle,
        billing=state.billing,
        instance_faults={
            "preempt": instance_fault(state.preempt),
            "unhealthy": instance_fault(state.make_error),
        },
        no_such_fault=lambda: Problem(404, "no such fault: preempt or unhealthy"),
    )
    app.include_router(admin, dependencies=authed)
    return app


class _Raw(Exception):
    """A fault's answer that is not RunPod's (garbage, a huge body)."""

    def __init__(self, response: Response) -> None:
        super().__init__("raw answer")
        self.response = response


def _rank(availability: str) -> int:
    return ("NONE", "LOW", "MEDIUM", "HIGH").index(availability)


def _fault_detail(status: int) -> str:
    return {
        400: "There are no longer any instances available with the requested specifications.",
        402: "insufficient balance",
        403: "access denied",
        429: "rate limit exceeded for the minute window",
    }.get(status, "upstream service unavailable")


class MockCloud(mockserver.MockCloud[MockRunPodState]):
    """The mock RunPod served on loopback (in-process: tests, demos, the benchmark)."""


def start_mock_cloud(config: RunPodMockConfig | None = None, port: int | None = None) -> MockCloud:
    """Serve the mock RunPod on 127.0.0.1 (a free port unless given) in a background thread."""
    state = MockRunPodState(config or RunPodMockConfig())
    server = mockserver.start_app(create_app(state), port)
    return MockCloud(server.url, state, server)


def serve_mock_cloud(config: RunPodMockConfig, port: int = 4200) -> None:
    """Serve the mock RunPod on 127.0.0.1:`port` in the foreground (the CLI's command)."""
    mockserver.serve_foreground(create_app(MockRunPodState(config)), port)
