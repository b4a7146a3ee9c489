"""The cloud adapters (Lambda, RunPod, Vast.ai) on the wire, at their edges: each test drives a
client against a real loopback server (a scripted one, or the provider's mock): a destroy Vast
refused, an empty launch answer, a 429's Retry-After, a 403 on a pool, a pod's whole bill, and a
404 that is not the provider's own "not found"."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from procure.clouds.base import (
    AuthError,
    CloudError,
    LaunchSpec,
    Offer,
    ProviderError,
)
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.pacing import Pacer as LambdaPacer
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.pacing import Pacer as RunPodPacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.clouds.specs import validate_answer
from procure.clouds.vast.client import VastCloud
from procure.clouds.vast.settings import VastSettings
from procure.local import free_port
from test_cloud_runpod import FakeTime

KEY = "review9-TEST-key-0123456789abcdef"


# --- a scripted provider on loopback ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Script:
    """Answers per (method, path): each request takes the next reply; the last one repeats."""

    routes: dict[tuple[str, str], list[Reply]]
    seen: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, path: str) -> Reply:
        with self.lock:
            self.seen.append((method, path))
            replies = self.routes.get((method, path))
            if not replies:
                return Reply(599, b"unscripted")
            return replies.pop(0) if len(replies) > 1 else replies[0]


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            reply = script.answer(self.command, self.path.split("?", 1)[0])
            raw = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *_args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(routes: dict[tuple[str, str], list[Reply]]) -> tuple[str, Script]:
        script = Script(routes)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", script

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def lambda_offer() -> Offer:
    return Offer("lambda", "gpu_1x_a10", "A10", 1, "us-east-1", 750_000, False, 1, 60)


def lambda_instance(instance_id: str, name: str, status: str = "active") -> dict[str, Any]:
    return {
        "id": instance_id,
        "name": name,
        "ip": "198.51.100.2",
        "status": status,
        "ssh_key_names": ["procure"],
        "file_system_names": [],
        "region": {"name": "us-east-1", "description": "Virginia, USA"},
        "instance_type": {
            "name": "gpu_1x_a10",
            "description": "1x A10 (24 GB PCIe)",
            "gpu_description": "A10 (24 GB PCIe)",
            "price_cents_per_hour": 75,
            "specs": {"vcpus": 30, "memory_gib": 200, "storage_gib": 1400, "gpus": 1},
        },
        "actions": {},
    }


# --- Vast.ai: a destroy Vast says failed is reported as done -------------------------------------


def test_vast_terminate_fails_when_vast_answers_success_false(scripted: Any) -> None:
    """Before the fix: Vast's destroyInstance answers 200 with `success` saying whether the instance
    was destroyed (spec; the official vastai SDK prints `msg` and does not destroy on `success:
    false`). The client ignores it and reports the instance terminating, so the fleet and the
    gateway book it ended while it still runs and bills."""
    refusal = {"success": False, "error": "destroy_failed", "msg": "could not destroy instance"}
    validate_answer("vast", "delete", "/api/v0/instances/{id}", 200, refusal)  # spec-valid
    url, script = scripted({("DELETE", "/api/v0/instances/4242/"): [Reply(200, refusal)]})

    async def scenario() -> Any:
        settings = VastSettings(VAST_API_KEY=KEY, VAST_API_URL=url, VAST_PACE_SCALE=0)
        c = VastCloud(settings)
        try:
            return await c.terminate(["4242"])
        finally:
            await c.aclose()

    with pytest.raises(CloudError):
        ended = asyncio.run(scenario())
        pytest.fail(f"Vast said the destroy failed, yet terminate reported {ended}")
    assert script.seen == [("DELETE", "/api/v0/instances/4242/")]


# --- Lambda: a launch answer without ids crashes the caller ---------------------------------------


def test_lambda_launch_answer_with_no_instance_ids_is_a_cloud_error(
    scripted: Any,
) -> None:
    """Before the fix: Lambda answering a launch with `instance_ids: []` makes `launch_spec` raise
    IndexError: the `RentalCloud` contract (and invariant 8) says every failure is a `CloudError`,
    so the agent's tick crashes instead of treating it as an ambiguous launch to look up by name."""
    empty = {"data": {"instance_ids": []}}
    validate_answer("lambda", "post", "/api/v1/instance-operations/launch", 200, empty)
    url, _ = scripted({("POST", "/api/v1/instance-operations/launch"): [Reply(200, empty)]})

    async def scenario() -> Any:
        settings = LambdaSettings(LAMBDA_API_KEY=KEY, LAMBDA_API_URL=url)
        c = LambdaCloud(settings, pacer=LambdaPacer(0.0, 0.0))
        try:
            return await c.launch_spec(LaunchSpec(name="procure-job-1", offer=lambda_offer()))
        finally:
            await c.aclose()

    try:
        asyncio.run(scenario())
    except CloudError as exc:
        assert isinstance(exc, ProviderError)  # ambiguous: look it up by name, maybe retry
    except Exception as exc:  # the bug: anything else escapes
        pytest.fail(f"launch_spec raised {type(exc).__name__}: {exc!r}, not a CloudError")
    else:
        pytest.fail("a launch with no instance id was reported as launched")


# --- Lambda: a 429's Retry-After is dropped ------------------------------------------------------


def test_lambda_honours_retry_after_of_a_429_before_its_next_call(scripted: Any) -> None:
    """Before the fix: after Lambda (or its proxy) answers 429 with `Retry-After: 20`, the next call
    from the same client goes out at once: the Lambda client only copies the value into the
    exception, and no caller reads it (RunPod's and Vast's clients pause their pacer). A busy caller
    then hammers a rate-limited account, prolonging the limit."""
    url, script = scripted(
        {
            ("GET", "/api/v1/instances"): [
                Reply(
                    429,
                    {"error": {"code": "global/too-many-requests", "message": "slow down"}},
                    {"Retry-After": "20"},
                ),
                Reply(200, {"data": [lambda_instance("i-1", "procure-job-1")]}),
            ]
        }
    )
    fake = FakeTime()

    async def scenario() -> None:
        settings = LambdaSettings(LAMBDA_API_KEY=KEY, LAMBDA_API_URL=url)
        pacer = LambdaPacer(0.0, 0.0, clock=fake.clock, sleep=fake.sleep)
        c = LambdaCloud(settings, pacer=pacer)
        try:
            with pytest.raises(CloudError):
                await c.find("procure-job-1")
            [found] = await c.find("procure-job-1")  # the caller tries again at once
            assert found.id == "i-1"
        finally:
            await c.aclose()

    asyncio.run(scenario())
    assert len(script.seen) == 2
    assert sum(fake.slept) >= 20, f"the retry went out after {sum(fake.slept)} s, not 20 s"


# --- RunPod: a 403 on createPod is not a bad key ------------------------------------------------


def test_runpod_403_on_create_is_a_skipped_candidate_not_a_refused_key(scripted: Any) -> None:
    """Before the fix: RunPod's createPod documents 403 as "your account cannot access the requested
    pool: skip this candidate, keep going". The client raises AuthError ("RunPod refused the API
    key"), so the agent cools down the whole RunPod account and tells the user their key is bad."""
    forbidden = {"title": "Forbidden", "status": 403, "detail": "access denied"}
    url, _ = scripted({("POST", "/v2/pods"): [Reply(403, forbidden)]})

    async def scenario() -> None:
        settings = RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=url)
        fake = FakeTime()
        c = RunPodCloud(settings, pacer=RunPodPacer(clock=fake.clock, sleep=fake.sleep))
        offer = Offer(
            "runpod", "SECURE:NVIDIA H100 80GB HBM3", "H100", 1, "US-TX-3", 2_990_000, False, 1, 1
        )
        try:
            with pytest.raises(CloudError) as caught:
                await c.launch_spec(LaunchSpec(name="procure-job-1", offer=offer, image="x:1"))
        finally:
            await c.aclose()
        assert not isinstance(caught.value, AuthError), str(caught.value)
        assert "API key" not in str(caught.value)

    asyncio.run(scenario())


# --- RunPod: a long-running pod's bill loses its early months -----------------------------------


def test_runpod_billed_counts_every_month_of_a_long_running_pod() -> None:
    """Before the fix: `RunPodCloud.billed` asks for `bucketSize=month&lastN=2`: only the current
    and the previous calendar month. A pod that ran longer (a gateway or fleet instance, a long
    training job) is booked for its last two months only, so spend under the caps is
    under-counted."""
    epoch = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    mock = start_runpod(
        RunPodMockConfig(
            api_key=KEY, speed=0, provision_s=10, start_s=20, node_port=free_port(), epoch=epoch
        )
    )

    async def scenario() -> tuple[int | None, int]:
        settings = RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=mock.url)
        fake = FakeTime()
        c = RunPodCloud(settings, pacer=RunPodPacer(clock=fake.clock, sleep=fake.sleep))
        try:
            offer = next(o for o in await c.offers() if o.gpu == "RTX4090")
            pod = await c.launch_spec(
                LaunchSpec(name="procure-gw-long", offer=offer, image="procure/node:1")
            )
            mock.state.clock.advance(timedelta(days=70).total_seconds())  # Jan 1 → Mar 12
            books = mock.state.billed(mock.state.pods[pod.id], mock.state.now())
            return await c.billed(pod.id), books
        finally:
            await c.aclose()

    try:
        billed, books = asyncio.run(scenario())
    finally:
        mock.stop()
    assert books > 0
    assert billed == books, f"RunPod billed {books} micro-USD; the client read {billed}"


def test_vast_only_its_own_404_means_an_instance_is_gone(scripted: Any) -> None:
    """Before the fix: Vast's own "gone" is `{"instances": null}` on show and 404 `{"error":
    "not_found"}` on destroy (spec). The client takes any 404 (a router's or CDN's plain page, a
    retired path) as "gone": terminate reports nothing to do and get returns None, so the agent
    books the instance ended while it runs and bills. Lambda's and RunPod's clients require their
    provider's code."""
    page = b"404 page not found"
    url, _ = scripted(
        {
            ("DELETE", "/api/v0/instances/4242/"): [Reply(404, page)],
            ("GET", "/api/v0/instances/4242/"): [Reply(404, page)],
        }
    )

    async def scenario() -> list[str]:
        settings = VastSettings(VAST_API_KEY=KEY, VAST_API_URL=url, VAST_PACE_SCALE=0)
        c = VastCloud(settings)
        wrong: list[str] = []
        try:
            try:
                await c.terminate(["4242"])
                wrong.append("terminate reported success")
            except CloudError:
                pass
            try:
                if await c.get("4242") is None:
                    wrong.append("get said the instance is gone")
            except CloudError:
                pass
        finally:
            await c.aclose()
        return wrong

    assert asyncio.run(scenario()) == []


# --- every client: a launch refused with its request echoed keeps the node token out ------------

TOKEN = "node-token-0123456789abcdef"


@pytest.mark.parametrize("provider", ["runpod", "vast"])
def test_a_refused_launch_that_echoes_the_request_keeps_the_node_token_out(
    scripted: Any, provider: str
) -> None:
    """A provider (or its proxy) that echoes the request body in its error must not put the
    node's token, sent in the launch's env, into procure's error (shown and stored)."""
    echo = f"bad request: env={{'GPU_WORKER_TOKEN': '{TOKEN}'}}"
    if provider == "runpod":
        url, _ = scripted(
            {("POST", "/v2/pods"): [Reply(400, {"title": "Bad Request", "detail": echo})]}
        )
        settings: Any = RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=url)
        client: Any = RunPodCloud(settings, pacer=RunPodPacer(0.0))
        offer = Offer(
            "runpod", "SECURE:NVIDIA A100 80GB PCIe", "A100", 1, "US-TX-3", 1_190_000, False, 1, 1
        )
    else:
        url, _ = scripted(
            {("PUT", "/api/v0/asks/4242/"): [Reply(400, {"error": "invalid_args", "msg": echo})]}
        )
        settings = VastSettings(VAST_API_KEY=KEY, VAST_API_URL=url, VAST_PACE_SCALE=0)
        client = VastCloud(settings)
        offer = Offer("vast", "4242", "A100", 1, "US", 1_000_000, False, 1, 1)

    async def scenario() -> str:
        spec = LaunchSpec(name="procure-job-1", offer=offer, env={"GPU_WORKER_TOKEN": TOKEN})
        try:
            with pytest.raises(CloudError) as caught:
                await client.launch_spec(spec)
        finally:
            await client.aclose()
        return str(caught.value)

    said = asyncio.run(scenario())
    assert "bad request" in said and TOKEN not in said, said
