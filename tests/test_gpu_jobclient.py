"""The client of a node's job runner: its address check (a node's token goes only to its own
node), a real round trip against a node on loopback, and a hostile node (redirects, garbage,
huge answers, hangs, 5xx, 429)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from gpu_fakes import FakeNvml, two_gpus
from procure.gpu.jobclient import NodeJobClient, NodeJobError, NodeUrlRefused, check_node_url
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, serve

TOKEN = "node-token-xyz"
TRAIN = [sys.executable, str(Path(__file__).parents[1] / "examples" / "train.py")]

ACCEPTED = [
    ("http://203.0.113.7:9876", "203.0.113.7", "http://203.0.113.7:9876"),
    ("https://203.0.113.7:443/", "203.0.113.7", "https://203.0.113.7:443"),
    ("http://Node-1.Example.com:80", "node-1.example.com", "http://node-1.example.com:80"),
    ("http://[2001:db8::1]:9876", "2001:db8:0::1", "http://[2001:db8::1]:9876"),
    ("http://203.0.113.7", "203.0.113.7", "http://203.0.113.7"),
]
REFUSED = [
    "http://token@203.0.113.7:9876",  # user info
    "http://u:p@203.0.113.7:9876",
    "http://203.0.113.7:9876@evil.example:80",  # the host is really evil.example
    "http://evil.example:80#@203.0.113.7:9876",
    "http://evil.example/203.0.113.7",
    "http://203.0.113.7.evil.example:9876",
    "http://203.0.113.7:9876/jobs",  # a path
    "http://203.0.113.7:9876?x=1",  # a query
    "http://203.0.113.7:9876#frag",  # a fragment
    "http://203.0.113.7:9876/?",
    "ftp://203.0.113.7:21",
    "file:///etc/passwd",
    "//203.0.113.7:9876",
    "203.0.113.7:9876",
    "http://203.0.113.7:0",
    "http://203.0.113.7:99999",
    "http://203.0.113.7:port",
    "http://203.0.113.7\\@evil.example:9876",
    "http://203.0.113.7 :9876",
    "http://203.0.113.7:9876\n",
    "http://%32%30%33.0.113.7:9876",  # percent-encoded host
    "http://[2001:db8::2]:9876",
    "http://[fe80::1%25eth0]:9876",
    "http://10.0.0.1:9876",
    "http://203.0.113.7.:9876",  # a trailing dot is another name
    "http://203.0.113.7:+80",
    "http://203.0.113.7:9876:80",
    "http://\uff12\uff10\uff13.0.113.7:9876",  # full-width digits
    "http://[::ffff:203.0.113.7]:9876",
    "",
]


@pytest.mark.parametrize(("url", "host", "base"), ACCEPTED)
def test_a_plain_address_of_the_instance_is_accepted(url: str, host: str, base: str) -> None:
    assert check_node_url(url, expected_host=host) == base


@pytest.mark.parametrize("url", REFUSED)
def test_every_trick_is_refused(url: str) -> None:
    with pytest.raises(NodeUrlRefused):
        check_node_url(url, expected_host="203.0.113.7")


def test_an_empty_expected_host_refuses_everything() -> None:
    with pytest.raises(NodeUrlRefused):
        check_node_url("http://203.0.113.7:1", expected_host="")


class Recorder:
    """A loopback server that records every request (the place a token must never reach)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def anything(request: Request, path: str) -> dict[str, Any]:
            self.seen.append({"path": path, "auth": request.headers.get("authorization")})
            return {"id": "job_0000000000000000", "status": "running", "progress": 0}

        self.server = serve(app)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    found = Recorder()
    yield found
    found.server.stop()


def hostile_node(target: str) -> FastAPI:
    app = FastAPI()
    huge = b'{"id": "' + b"x" * (3 << 20) + b'"}'

    @app.api_route("/jobs/{rest:path}", methods=["GET", "POST"])
    @app.api_route("/jobs", methods=["GET", "POST"])
    async def behave(request: Request) -> Response:
        mode = request.headers.get("x-mode") or "redirect"
        match mode:
            case "redirect":
                return RedirectResponse(f"{target}/jobs", status_code=307)
            case "garbage":
                return Response(b"<html>not json", media_type="application/json")
            case "huge":
                return Response(huge, media_type="application/json")
            case "hang":
                await asyncio.sleep(3)
            case "deep":
                return Response(b"[" * 10_000 + b"]" * 10_000, media_type="application/json")
            case "busy":
                return JSONResponse({"error": "slow down"}, status_code=429)
            case "down":
                return JSONResponse({"error": "boom"}, status_code=503)
            case "notajob":
                return JSONResponse({"id": "../../admin", "status": "running", "progress": 0})
        return JSONResponse({"error": "refused"}, status_code=401)

    return app


def test_the_token_goes_only_to_the_node(recorder: Recorder) -> None:
    # The cloud says the instance is 127.0.0.2: a URL naming 127.0.0.1 gets nothing sent.
    with pytest.raises(NodeUrlRefused):
        NodeJobClient(recorder.server.url, TOKEN, expected_host="127.0.0.2")
    with pytest.raises(NodeUrlRefused):
        NodeJobClient(f"http://{TOKEN}@127.0.0.1:{recorder.server.port}", TOKEN)
    assert recorder.seen == []

    # A node that redirects elsewhere: the redirect is not followed, the token stays home.
    hostile = serve(hostile_node(recorder.server.url))
    try:

        async def go() -> NodeJobError:
            async with NodeJobClient(hostile.url, TOKEN, expected_host="127.0.0.1") as client:
                with pytest.raises(NodeJobError) as caught:
                    await client.submit(command=["true"])
                assert TOKEN not in repr(client)
                return caught.value

        error = asyncio.run(go())
    finally:
        hostile.stop()
    assert error.status == 307 and recorder.seen == []


@pytest.fixture(scope="module")
def hostile() -> Iterator[LocalServer]:
    server = serve(hostile_node("http://127.0.0.1:9"))
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("mode", "retryable", "words"),
    [
        ("garbage", True, "malformed"),
        ("huge", True, "bytes"),
        ("hang", True, "timed out"),
        ("deep", True, "nested"),
        ("busy", True, "HTTP 429: slow down"),
        ("down", True, "HTTP 503: boom"),
        ("refused", False, "HTTP 401"),
        ("notajob", True, "not a job"),
    ],
)
def test_a_bad_answer_is_an_error_never_a_crash_or_a_hang(
    hostile: LocalServer, mode: str, retryable: bool, words: str
) -> None:
    async def go() -> NodeJobError:
        client = NodeJobClient(hostile.url, TOKEN, deadline_s=1.0)
        client._http.headers["x-mode"] = mode
        async with client:
            with pytest.raises(NodeJobError) as caught:
                await client.status("job_0123456789abcdef")
            return caught.value

    started = time.monotonic()
    error = asyncio.run(go())
    assert words in str(error) and error.retryable is retryable
    assert time.monotonic() - started < 20  # bounded by the deadline, not by the node


def test_an_unreachable_node_is_a_retryable_error() -> None:
    async def go() -> None:
        async with NodeJobClient("http://127.0.0.1:9", TOKEN, deadline_s=2) as client:
            await client.status("job_0123456789abcdef")

    with pytest.raises(NodeJobError, match="connection refused") as caught:
        asyncio.run(go())
    assert caught.value.retryable and caught.value.status is None


def test_a_job_id_that_is_not_one_is_never_put_in_a_path(recorder: Recorder) -> None:
    async def go() -> None:
        async with NodeJobClient(recorder.server.url, TOKEN) as client:
            await client.status("../lease")

    with pytest.raises(NodeJobError, match="not a job id"):
        asyncio.run(go())
    assert recorder.seen == []


def test_submit_status_logs_cancel_against_a_real_node(tmp_path: Path) -> None:
    settings = GpuWorkerSettings(GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_CHECKPOINT_DIR=str(tmp_path))
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))

    async def go() -> dict[str, Any]:
        async with NodeJobClient(server.url, TOKEN, expected_host="127.0.0.1") as client:
            command = [*TRAIN, "--steps", "20", "--step-time", "0", "--checkpoint-every", "5"]
            job = await client.submit(command=command, idempotency_key="k-1")
            again = await client.submit(command=command, idempotency_key="k-1")
            assert again["id"] == job["id"]
            deadline = time.monotonic() + 30
            while (job := await client.status(job["id"]))["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            first = await client.logs(job["id"], limit=5)
            rest = await client.logs(job["id"], after=first["next"], limit=1_000)
            cancelled = await client.cancel(job["id"])  # a finished job stays as it was
            wrong = NodeJobClient(server.url, "not-the-token")
            async with wrong:
                with pytest.raises(NodeJobError) as caught:
                    await wrong.status(job["id"])
            assert caught.value.status == 401 and not caught.value.retryable
            with pytest.raises(NodeJobError) as missing:
                await client.status("job_ffffffffffffffff")
            assert missing.value.status == 404
            return {"job": job, "first": first, "rest": rest, "cancelled": cancelled}

    try:
        seen = asyncio.run(go())
    finally:
        server.stop()
    job = seen["job"]
    assert job["status"] == "completed" and job["progress"] == 1.0 and job["exitCode"] == 0
    assert job["checkpoint"].endswith("step-000020.json")
    assert [line["seq"] for line in seen["first"]["lines"]] == [1, 2, 3, 4, 5]
    assert seen["rest"]["done"] and seen["rest"]["lines"][-1]["text"].startswith("done:")
    assert seen["cancelled"]["status"] == "completed"
