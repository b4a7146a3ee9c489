"""BYOC registration against go-livepeer's orchestrator as byoc/job_orchestrator.go behaves: the
registration carries the node's token in `token`, so a job the orchestrator forwards (with
`Authorization: Bearer <token>`) is served instead of refused with 401, after which go-livepeer
drops the capability; go-livepeer's own refusals ("invalid authorization", "Error registering
capability: ...") are reported and not retried."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from gpu_fakes import FakeNvml, eventually, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings, capability_token
from procure.local import LocalServer, free_port, serve

SECRET = "orch-secret"
NAME = "agent-net-wire"


@dataclass
class GoOrchestrator:
    """What the mock keeps: go-livepeer's ExternalCapabilities map (name -> url, token)."""

    secret: str = SECRET
    answer_register: tuple[int, str] | None = None  # force an answer (go-livepeer's own text)
    capabilities: dict[str, dict[str, str]] = field(default_factory=dict)
    attempts: int = 0


def go_orchestrator(orch: GoOrchestrator) -> FastAPI:
    app = FastAPI()

    @app.api_route("/capability/register", methods=["GET", "POST"])
    async def register(request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("Method not allowed\n", 405)  # http.Error adds "\n"
        orch.attempts += 1
        if request.headers.get("authorization", "") != orch.secret:
            return PlainTextResponse("invalid authorization\n", 400)
        if orch.answer_register is not None:
            return PlainTextResponse(orch.answer_register[1], orch.answer_register[0])
        try:
            cap = json.loads(await request.body())  # json.Unmarshal into ExternalCapability
        except ValueError as exc:
            return PlainTextResponse(f"Error registering capability: {exc}", 400)
        orch.capabilities[cap["name"]] = {"url": cap["url"], "token": cap.get("token", "")}
        return PlainTextResponse("ok")

    @app.post("/process/request/{route:path}")
    async def process(route: str, request: Request) -> Response:
        name = request.headers["livepeer-capability"]
        cap = orch.capabilities.get(name)
        if cap is None:
            return PlainTextResponse("capability not found\n", 400)
        headers = {"Content-Type": "application/json"}
        if cap["token"]:  # "Add Authorization header if auth token is set for this capability"
            headers["Authorization"] = "Bearer " + cap["token"]
        async with httpx.AsyncClient(timeout=10) as client:
            worker = await client.post(
                f"{cap['url']}/{route}", content=await request.body(), headers=headers
            )
        if worker.status_code == 401:  # go-livepeer removes the capability
            orch.capabilities.pop(name, None)
            return PlainTextResponse(
                "job not able to be processed, removing capability err=worker auth token failed\n",
                500,
            )
        return Response(worker.content, worker.status_code, media_type="application/json")

    return app


@contextmanager
def world(orch: GoOrchestrator, **env: Any) -> Iterator[tuple[str, LocalServer]]:
    orchestrator = serve(go_orchestrator(orch))
    port = free_port()
    settings = GpuWorkerSettings(
        ORCHESTRATOR_URL=orchestrator.url,
        ORCHESTRATOR_SECRET=env.pop("secret", SECRET),
        CAPABILITY_NAME=NAME,
        CAPABILITY_URL=f"http://127.0.0.1:{port}",
        CAPABILITY_RETRY_MIN_S=0.05,
        CAPABILITY_RETRY_MAX_S=0.2,
        **env,
    )
    module = FakeNvml(two_gpus()).module()
    node = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)), port=port)
    try:
        yield orchestrator.url, node
    finally:
        node.stop()
        orchestrator.stop()


def test_a_forwarded_job_is_authorised_by_the_registered_token() -> None:
    orch = GoOrchestrator()
    with world(orch, GPU_WORKER_TOKEN="node-token-1") as (url, node):
        eventually(lambda: NAME in orch.capabilities, "registration")
        # The orchestrator gets a token of the capability's routes, not the node's own.
        assert orch.capabilities[NAME]["token"] == capability_token("node-token-1")
        job = httpx.post(
            f"{url}/process/request/gpu-check",
            json={"agent_id": "gateway-job"},
            headers={"Livepeer-Capability": NAME},
            timeout=15,
        )
        assert job.status_code == 200, job.text
        assert job.json()["agent_id"] == "gateway-job" and job.json()["gpu_count"] == 2
        assert NAME in orch.capabilities  # still registered: nothing was refused
        health = httpx.get(f"{node.url}/healthz", timeout=10).text
        assert "node-token-1" not in health  # the token goes only to the orchestrator


def test_go_livepeers_wrong_secret_answer_is_a_refusal_not_retried() -> None:
    orch = GoOrchestrator()
    with world(orch, secret="not-the-secret", CAPABILITY_REFRESH_S=0.05) as (_, node):
        eventually(
            lambda: httpx.get(f"{node.url}/healthz").json()["registration"]["state"] == "refused",
            "refusal",
        )
        said = httpx.get(f"{node.url}/healthz").json()["registration"]["last_error"]
        attempts = orch.attempts
        time.sleep(0.3)  # several retry intervals: none may come
        assert orch.attempts == attempts == 1
    assert "invalid authorization" in said and "ORCHESTRATOR_SECRET" in said


def test_go_livepeers_register_error_is_a_refusal_not_retried() -> None:
    orch = GoOrchestrator(answer_register=(400, "Error registering capability: bad price"))
    with world(orch, CAPABILITY_REFRESH_S=0.05) as (_, node):
        eventually(
            lambda: httpx.get(f"{node.url}/healthz").json()["registration"]["state"] == "refused",
            "refusal",
        )
        said = httpx.get(f"{node.url}/healthz").json()["registration"]["last_error"]
    assert "could not read our capability" in said and "bad price" in said
    assert orch.attempts == 1
