"""A vendor or GPU node that echoes our own credential back in its error text or log lines (a
hostile one, or a buggy proxy in front of one) must not get it stored, shown by the API, the
dashboard or a gateway's job status, or logged; and `procure vendors seed` refuses an endpoint
that carries a password, as the API does."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_fakes import FakeCloud, cloud_vendor, new_run, new_store, offer
from cloud_fakes import drive as cloud_drive
from cloud_fakes import make_deps as cloud_deps
from procure.agent.cloud_node import HttpNode
from procure.agent.context import PlanContext
from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.api.app import create_app
from procure.gateway.runtime import http_node as gateway_http_node
from procure.local import (
    LocalServer,
    facilitator_client,
    mock_vendor_config,
    serve,
    start_facilitator,
)
from procure.models import Action
from procure.safetext import RedactingFilter
from procure.settings import Settings
from procure.store import Store, open_store, repo
from procure.vendors.mock import create_mock_vendor_app
from test_gateway import buy, job_status, start_gateway_world, wait_for
from world import SECRET, World, drive, rewriting, start_world, state_of

VENDOR = "gpu_vendor_1"


class _EchoesTheKey:
    """A vendor whose quote is refused with an answer that repeats the request's Authorization
    header, and the bare key in it, as a careless error handler does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/quote":
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        key = auth.removeprefix("Bearer ")
        body = json.dumps(
            {"error": f"no plan for key {key}; request headers were {{'authorization': '{auth}'}}"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _job_fails_echoing_the_key(answer: dict[str, Any]) -> dict[str, Any]:
    """A job-status answer whose job failed, its error and a log line quoting our key."""
    return {
        **answer,
        "status": "failed",
        "error": f"worker crashed: env GPU_VENDOR_SECRET={SECRET} rejected",
        "logs": [*answer.get("logs", []), f"auth: using key {SECRET}"],
    }


def _vendor_behind(world: World, wrap: Any) -> None:
    """The mock vendor `VENDOR` behind `wrap` (the hostile layer), registered at its address."""
    vendor = world.vendors[VENDOR]
    cfg = mock_vendor_config(vendor, world.facilitator.url, SECRET, job_seconds=0.6)
    server = serve(wrap(create_mock_vendor_app(cfg, facilitator_client(world.facilitator.url))))
    world.servers.append(server)
    with world.store.session() as s:
        repo.save_vendor(s, vendor.model_copy(update={"endpoint": server.url}))


async def _start_at_the_vendor(ctx: PlanContext) -> Action:
    return Action(action="start_job", vendor_id=VENDOR, hours=ctx.remaining_hours, reason="only")


@pytest.fixture
def world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    w = start_world(tmp_path, sqlite_url)
    yield w
    w.stop()


def _everything_shown(world: World, run_id: str) -> str:
    """What a user can read about the run: the store's state, the API's status answer and
    run routes, the dashboard's run page."""
    return _shown(world.settings, world.store, run_id)


def _shown(settings: Settings, store: Store, run_id: str) -> str:
    server = serve(create_app(settings, store, budget_warnings=False))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            status = api.get("/api/agent-status", params={"runId": run_id})
            run = api.get(f"/api/runs/{run_id}")
            page = api.get(f"/runs/{run_id}")
    finally:
        server.stop()
    assert status.status_code == 200 and page.status_code == 200, (status.text, page.text)
    with store.session() as s:
        state = repo.load_state(s, run_id)
    assert state is not None
    return "\n".join([state.model_dump_json(), status.text, run.text, page.text])


def test_a_vendor_echoing_our_key_in_its_refusal_never_shows_it(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix: the vendor's 403 text, which repeats our Authorization header, was stored
    clipped but whole, so the run's observations, the API and the dashboard showed our key."""
    _vendor_behind(world, _EchoesTheKey)
    run_id = world.new_run(budget=5.0)

    async def one_tick() -> str:
        deps = world.deps()
        deps.planner = _start_at_the_vendor  # type: ignore[assignment]
        try:
            return (await tick(deps, run_id)).message
        finally:
            await close_deps(deps)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(one_tick())

    shown = _everything_shown(world, run_id)
    errors = [o.content for o in state_of(world, run_id).observations if o.type == "error"]
    assert any("403" in e and "no plan for key" in e for e in errors), errors  # it was said
    assert SECRET not in shown
    assert SECRET not in caplog.text


def test_a_vendor_echoing_our_key_in_a_failed_job_never_shows_it(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix: a failed job's error and log lines from the vendor, quoting our key, were
    stored as the job's error message and the run's log observations, and shown as they came."""
    _vendor_behind(world, lambda app: rewriting(app, _job_fails_echoing_the_key))
    run_id = world.new_run(budget=5.0)
    deps = world.deps()
    deps.planner = _start_at_the_vendor  # type: ignore[assignment]

    with caplog.at_level(logging.DEBUG):
        asyncio.run(drive(deps, run_id))

    state = state_of(world, run_id)
    failed = [j for j in state.jobs if j.vendor_id == VENDOR and j.status == "failed"]
    assert failed and "worker crashed" in (failed[0].error_message or "")  # the vendor's words
    assert any("auth: using key" in o.content for o in state.observations)  # its log line kept
    shown = _everything_shown(world, run_id)
    assert SECRET not in shown
    assert SECRET not in caplog.text


def _node_echoing_its_token(tokens: list[str]) -> Starlette:
    """A GPU node (the job runner's routes) whose job fails at once, its error and its log line
    quoting the bearer token it was called with (`tokens` collects them)."""

    def token(request: Request) -> str:
        said = request.headers.get("authorization", "").removeprefix("Bearer ")
        tokens.append(said)
        return said

    async def submit(request: Request) -> JSONResponse:
        token(request)
        return JSONResponse({"id": "job-1", "status": "running", "progress": 0.1})

    async def status(request: Request) -> JSONResponse:
        said = f"crashed: the runner was started with token {token(request)}"
        return JSONResponse(
            {"id": "job-1", "status": "failed", "progress": 0.2, "exitCode": 1, "error": said}
        )

    async def logs(request: Request) -> JSONResponse:
        line = {"seq": 1, "text": f"runner token {token(request)}"}
        return JSONResponse({"lines": [line], "next": 1})

    async def cancel(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/jobs", submit, methods=["POST"]),
            Route("/jobs/{job_id}", status, methods=["GET"]),
            Route("/jobs/{job_id}/logs", logs, methods=["GET"]),
            Route("/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        ]
    )


def test_a_gpu_node_echoing_its_token_in_a_failed_job_never_shows_it(tmp_path: Path) -> None:
    """Before the fix: a cloud job's error from the instance's node, quoting the node token the
    agent sent it, was stored as the job's error message and shown by the API and dashboard
    (whoever reads the run could then drive the node's job runner)."""
    tokens: list[str] = []
    node = serve(_node_echoing_its_token(tokens))  # type: ignore[arg-type]
    cloud = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], job_s=30.0)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = new_store(url, [cloud_vendor("rp", "runpod", 50.0)])
    deps = cloud_deps(store, {"runpod": cloud})
    deps.node_client = lambda _url, token: HttpNode(node.url, token)  # the real HTTP client
    run_id = new_run(store, 100.0)

    def failed() -> bool:
        with store.session() as s:
            state = repo.load_state(s, run_id)
        return state is not None and any(j.status == "failed" for j in state.jobs)

    try:
        asyncio.run(cloud_drive(deps, run_id, until=failed))
        assert tokens and all(len(t) >= 16 for t in tokens)  # the node was asked, with a token
        with store.session() as s:
            state = repo.load_state(s, run_id)
        assert state is not None
        errors = [j.error_message or "" for j in state.jobs if j.status == "failed"]
        assert any("crashed: the runner was started" in e for e in errors), errors
        shown = _shown(Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path), store, run_id)
        assert not any(t in shown for t in set(tokens))
    finally:
        node.stop()
        store.dispose()


def _gateway_node_echoing_its_token(tokens: list[str]) -> Starlette:
    """A GPU node as the gateway's job client speaks to it, whose job fails at once, its error
    and log line quoting the node token it was called with (`tokens` collects them)."""

    def token(request: Request) -> str:
        said = request.headers.get("authorization", "").removeprefix("Bearer ")
        tokens.append(said)
        return said

    def job(request: Request, status: str) -> JSONResponse:
        said = f"crashed: the runner was started with token {token(request)}"
        return JSONResponse(
            {"id": "job_00000000000000a1", "status": status, "progress": 0.2, "exitCode": 1}
            | ({"error": said} if status == "failed" else {})
        )

    async def submit(request: Request) -> JSONResponse:
        return job(request, "running")

    async def status(request: Request) -> JSONResponse:
        return job(request, "failed")

    async def logs(request: Request) -> JSONResponse:
        line = {"seq": 1, "text": f"runner token {token(request)}"}
        return JSONResponse({"lines": [line], "next": 1, "done": True})

    return Starlette(
        routes=[
            Route("/jobs", submit, methods=["POST"]),
            Route("/jobs/{job_id}", status, methods=["GET"]),
            Route("/jobs/{job_id}/logs", logs, methods=["GET"]),
            Route("/jobs/{job_id}/cancel", status, methods=["POST"]),
        ]
    )


def test_a_gateway_buyer_never_sees_the_node_token_a_node_echoes(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: the gateway relayed a node's job error and log lines to the buyer as they
    came, so a node quoting the token the gateway sent it handed the buyer that token."""
    tokens: list[str] = []
    node = serve(_gateway_node_echoing_its_token(tokens))  # type: ignore[arg-type]
    gw = start_gateway_world(tmp_path, sqlite_url)
    try:
        rt = gw.server.app.state.runtime
        # Every instance's node is this one (on loopback), reached by the gateway's own client.
        rt.node = lambda _url, token, _host: gateway_http_node(node.url, token, "127.0.0.1")
        job_id = buy(gw, "echo")
        failed = wait_for(lambda: (s := job_status(gw, job_id))["status"] == "failed" and s)
        answer = json.dumps(failed)
        assert "crashed: the runner was started" in answer, answer  # the node's words, relayed
        assert tokens and all(len(t) >= 16 for t in tokens)
        assert not any(t in answer for t in set(tokens)), answer
    finally:
        gw.stop()
        node.stop()


def _procure(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "PROCURE_"))}
    return subprocess.run(
        [sys.executable, "-m", "procure.cli", *args],
        env={**clean, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def facilitator(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_facilitator(tmp_path / "chain.json")
    yield server
    server.stop()


def test_vendors_seed_refuses_a_host_with_a_password_as_the_api_does(
    tmp_path: Path, sqlite_url: str, facilitator: LocalServer
) -> None:
    """Before the fix: `procure vendors seed --host http://user:pass@host` stored both vendors
    with the password in their endpoint (shown in every vendor list and page), although
    `PUT /api/vendors` refuses such an endpoint."""
    password = "hunter2-seed-password"
    env = {
        "PROCURE_DATABASE_URL": sqlite_url,
        "PROCURE_HOME": str(tmp_path / "home"),
        "GPU_VENDOR_SECRET": "h92-vendor-secret",
        "X402_FACILITATOR_URL": facilitator.url,
    }
    seeded = _procure("vendors", "seed", "--host", f"http://admin:{password}@127.0.0.1", env=env)

    assert seeded.returncode == 1, seeded.stdout
    assert "user or password" in seeded.stderr and "Traceback" not in seeded.stderr
    assert password not in seeded.stdout + seeded.stderr
    store = open_store(sqlite_url)
    try:
        with store.session() as s:
            endpoints = [v.endpoint for v in repo.list_vendors(s)]
    finally:
        store.dispose()
    assert not any(password in e for e in endpoints), endpoints


def test_the_settings_secrets_are_never_logged_whoever_echoes_them() -> None:
    """Before the fix: only the credentials a client sent were remembered; the API token, the
    metrics token, an LLM's key and the facilitator URL's password, echoed in a proxy's error
    page or a library's message, were logged as they came."""
    Settings(
        _env_file=None,
        PROCURE_API_TOKEN="api-token-echoed-1",
        PROCURE_METRICS_TOKEN="metrics-token-echoed-2",
        OPENAI_API_KEY="sk-llm-key-echoed-3",
        X402_FACILITATOR_URL="http://agent:facilitator-pw-4@127.0.0.1:4020",
    )
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("procure.test.echo")
    # Its own level: what another test in this process left on the root logger (a server's
    # `basicConfig(level=...)` run in a thread between tests) must not swallow the line.
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        log.warning(
            "upstream said: bad token api-token-echoed-1 / metrics-token-echoed-2 / "
            "sk-llm-key-echoed-3 / password facilitator-pw-4"
        )
    finally:
        log.removeHandler(handler)
    assert lines and "upstream said" in lines[0]
    for secret in ("api-token-echoed-1", "metrics-token-echoed-2", "sk-llm-key", "facilitator-pw"):
        assert secret not in lines[0]
