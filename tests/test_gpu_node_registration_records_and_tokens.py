"""Hostile review of the GPU node's orchestrator link and state: a go-livepeer secret with
non-ASCII characters registers (go-livepeer compares the header's bytes), an orchestrator (or a
proxy in front of it) that echoes our credentials back does not get them shown on the node's open
/healthz or in its log, NVML GPM samples are freed when a GPU cannot be sampled, and no saved
record (numbers or paths out of range, a named pipe) stops the node from starting, and the token
registered with the orchestrator opens the capability's routes, never jobs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from gpu_fakes import ERRORS, FakeNvml, eventually, two_gpus
from procure.gpu.probe import GpmWatch, read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, free_port, serve

NAME = "agent-net-h95"
NODE_TOKEN = "node-token-h95-0123456789"


def byte_comparing_orchestrator(
    secret: str, seen: list[bytes], bodies: list[dict[str, Any]] | None = None
) -> FastAPI:
    """go-livepeer's RegisterCapability: `r.Header.Get("Authorization") != orchSecret` compares
    the header's bytes with the secret's UTF-8 bytes; 400 "invalid authorization" otherwise.
    What it accepted goes to `bodies` (go-livepeer keeps the capability's `token`)."""
    app = FastAPI()

    @app.post("/capability/register")
    async def register(request: Request) -> Response:
        raw = dict(request.headers.raw).get(b"authorization", b"")
        seen.append(raw)
        if raw != secret.encode("utf-8"):
            return PlainTextResponse("invalid authorization\n", 400)
        if bodies is not None:
            bodies.append(json.loads(await request.body()))
        return PlainTextResponse("ok")

    return app


def echoing_proxy() -> FastAPI:
    """What sits at a mistyped ORCHESTRATOR_URL: a debugging proxy whose 404 page repeats the
    request it could not route, headers and body included."""
    app = FastAPI()

    @app.post("/capability/register")
    async def register(request: Request) -> Response:
        body = (await request.body()).decode()
        return PlainTextResponse(
            f"no upstream; Authorization: {request.headers.get('authorization')}; body {body}",
            404,
        )

    return app


@contextmanager
def node(orchestrator_url: str, secret: str) -> Iterator[tuple[LocalServer, httpx.Client]]:
    with tempfile.TemporaryDirectory() as root, _node(orchestrator_url, secret, root) as served:
        yield served


@contextmanager
def _node(
    orchestrator_url: str, secret: str, root: str
) -> Iterator[tuple[LocalServer, httpx.Client]]:
    settings = GpuWorkerSettings(
        GPU_WORKER_CHECKPOINT_DIR=root,
        ORCHESTRATOR_URL=orchestrator_url,
        ORCHESTRATOR_SECRET=secret,
        GPU_WORKER_TOKEN=NODE_TOKEN,
        CAPABILITY_NAME=NAME,
        CAPABILITY_URL="http://worker:9876",
        CAPABILITY_DESCRIPTION="x",
        CAPABILITY_RETRY_MIN_S=0.05,
        CAPABILITY_RETRY_MAX_S=0.2,
    )
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield server, client
    finally:
        server.stop()


def registration(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/healthz").json()["registration"])


def test_a_secret_with_accented_characters_registers_as_go_livepeer_compares_it() -> None:
    """Before the fix: an ORCHESTRATOR_SECRET with a non-ASCII character (a valid -orchSecret for
    go-livepeer) made httpx raise UnicodeEncodeError, which ended the registration task: the node
    never registered, never retried, and /healthz said "registering" forever with no error."""
    secret = "clé-secrète-ü"
    seen: list[bytes] = []
    orchestrator = serve(byte_comparing_orchestrator(secret, seen))
    try:
        with node(orchestrator.url, secret) as (_server, client):
            eventually(
                lambda: registration(client)["state"] == "registered",
                f"registered (healthz says {registration(client)})",
            )
            assert seen and seen[-1] == secret.encode("utf-8")
    finally:
        orchestrator.stop()


def test_credentials_an_orchestrator_echoes_back_are_not_shown_on_healthz_or_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before the fix: the orchestrator's answer was kept as the registration's last error and
    shown on the node's open /healthz (and logged) with only URL passwords and bearer tokens
    redacted: the raw orchestrator secret, and the node's own token from the body, were shown to
    anyone who could reach the port (the node token runs any command on the instance)."""
    secret = "orchSecretH95zzz"
    proxy = serve(echoing_proxy())
    caplog.set_level(logging.INFO, logger="procure.gpu.registration")
    try:
        with node(proxy.url, secret) as (_server, client):
            eventually(lambda: registration(client)["state"] == "refused", "refused")
            shown = client.get("/healthz").text
    finally:
        proxy.stop()
    assert "no upstream" in shown  # what the orchestrator said is still there to read
    assert secret not in shown
    assert NODE_TOKEN not in shown
    assert secret not in caplog.text
    assert NODE_TOKEN not in caplog.text


class GpmNvml:
    """pynvml's GPM calls on top of a fake NVML: every GPU says it supports GPM, but taking a
    sample fails (as nvmlGpmSampleGet does on a GPU in MIG mode); allocations are counted."""

    def __init__(self) -> None:
        self.live = 0

    def extend(self, module: types.ModuleType) -> types.ModuleType:
        def alloc() -> object:
            self.live += 1
            return object()

        def free(_sample: object) -> None:
            self.live -= 1

        def sample_get(_handle: object, _sample: object) -> None:
            raise ERRORS["NVMLError_NotSupported"]()

        module.nvmlGpmSampleAlloc = alloc  # type: ignore[attr-defined]
        module.nvmlGpmSampleFree = free  # type: ignore[attr-defined]
        module.nvmlGpmSampleGet = sample_get  # type: ignore[attr-defined]
        module.nvmlGpmQueryDeviceSupport = lambda _h: types.SimpleNamespace(  # type: ignore[attr-defined]
            isSupportedDevice=1
        )
        return module


def test_a_gpu_that_cannot_be_sampled_does_not_leak_a_gpm_sample_per_read() -> None:
    """Before the fix: when nvmlGpmSampleGet failed after nvmlGpmSampleAlloc (a GPU in MIG
    mode), the sample was never freed: each probe leaked one NVML allocation per GPU, so a node
    scraped for weeks grew without bound."""
    gpm = GpmNvml()
    module = gpm.extend(FakeNvml(two_gpus()).module())
    watch = GpmWatch()
    for _ in range(50):
        probe = read_nvml(module, gpm=watch)
        assert probe.gpu_count == 2
    assert gpm.live == 0


# --- records on disk that a job could have written ------------------------------------------


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _dead_node() -> dict[str, Any]:
    """A node record of this boot whose process is gone (so its jobs are leftovers)."""
    return {"pid": 1, "start": -1, "boot": _boot_id()}


HOSTILE_RECORDS = {
    "a job whose pid no pid_t holds": (
        "jobs/job_00000000000000aa.json",
        lambda: {"job": "job_a", "pid": 2**31, "start": 1, "node": _dead_node()},
    ),
    "a job whose docker path holds a NUL": (
        "jobs/job_00000000000000bb.json",
        lambda: {
            "job": "job_b",
            "pid": 2**22 + 7,  # no such process: nothing is killed
            "start": 1,
            "node": _dead_node(),
            "docker": "/usr/bin/do\u0000cker",
            "container": "procure-job_b",
        },
    ),
    "a lease whose ttl no float holds": (
        "lease.json",
        lambda: {"holder": "fleet", "ttl_s": 10**400, "expires_at": 10**400, "node": _dead_node()},
    ),
}


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="Linux /proc")
@pytest.mark.parametrize("case", sorted(HOSTILE_RECORDS))
def test_a_node_whose_saved_record_holds_numbers_or_paths_out_of_range_still_starts(
    tmp_path: Path, case: str
) -> None:
    """Before the fix: a broken record is meant to be no record, but one naming a pid beyond
    pid_t (os.killpg raised OverflowError), a docker path with a NUL byte (ValueError from
    exec) or a lease ttl beyond a float (OverflowError) raised at start: the node never started,
    so it ran no job and never took up its lease. The state folder sits in the checkpoint root,
    which jobs write."""
    record, make = HOSTILE_RECORDS[case]
    root = tmp_path / "ckpt"
    path = root / ".procure-node" / record
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(make()))
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN=NODE_TOKEN,
        GPU_WORKER_CHECKPOINT_DIR=str(root),
        GPU_WORKER_ON_ORPHAN="true",
    )
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


@contextmanager
def node_process(
    root: Path, log: Path, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`procure gpu-worker` as a real process, its state under `root`."""
    port = free_port()
    full = {
        **os.environ,
        "GPU_WORKER_TOKEN": NODE_TOKEN,
        "GPU_WORKER_CHECKPOINT_DIR": str(root),
        "OLLAMA_URL": "",
        "ORCHESTRATOR_URL": "",
        **env,
    }
    argv = [sys.executable, "-m", "procure.cli", "gpu-worker", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process, f"http://127.0.0.1:{port}"
        finally:
            process.kill()  # a node stuck where the bug left it does not stop on SIGTERM
            process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
@pytest.mark.parametrize("record", ["lease.json", "jobs/job_00000000000000cc.json"])
def test_a_node_whose_saved_record_is_a_named_pipe_still_starts(
    tmp_path: Path, record: str
) -> None:
    """Before the fix: the node opened each saved record at start and read it, so a named pipe
    left in its place (the state folder sits in the checkpoint root, which jobs write) blocked
    the start for good, waiting for a writer: the node never answered, ran no job and never
    took up its lease."""
    root = tmp_path / "ckpt"
    path = root / ".procure-node" / record
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with node_process(root, tmp_path / "node.log", GPU_WORKER_ON_ORPHAN="true") as (process, url):
        eventually(
            lambda: process.poll() is None and _answers(url),
            f"the node answered ({(tmp_path / 'node.log').read_text()[-2000:]})",
            within_s=60,
        )


def test_the_token_an_orchestrator_is_given_opens_the_capability_but_runs_no_command() -> None:
    """Before the fix: the node registered its own GPU_WORKER_TOKEN as the capability's token,
    and that one token opens every route: the orchestrator (any pool an owner registers with)
    could run any command on the instance through /jobs, or disarm its dead-man lease."""
    secret = "orch-secret"
    seen: list[bytes] = []
    bodies: list[dict[str, Any]] = []
    orchestrator = serve(byte_comparing_orchestrator(secret, seen, bodies))
    try:
        with node(orchestrator.url, secret) as (_server, client):
            eventually(lambda: bodies, "registered")
            given = {"Authorization": f"Bearer {bodies[-1]['token']}"}
            check = client.post("/gpu-check", json={"agent_id": "gw"}, headers=given)
            assert check.status_code == 200  # what the orchestrator forwards still works
            job = client.post("/jobs", json={"command": ["true"]}, headers=given)
            assert job.status_code in (401, 403), job.text
    finally:
        orchestrator.stop()
