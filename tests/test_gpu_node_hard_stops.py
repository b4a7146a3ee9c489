"""The GPU node leaves nothing running when it stops, however it stops: a stalled client cannot
hold SIGTERM's shutdown, a node killed hard takes its job with it, a restarted node takes up its
lease, a stopping node unregisters; and a local checkpointDir is mounted by its absolute path.
Real processes and real HTTP on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_fakes import FakeNvml, Orchestrator, mock_orchestrator, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import free_port, serve

TOKEN = "review9-node-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PY = sys.executable
# A job that says who it is, then holds on (as a long training run does, printing rarely).
HOLD = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"


@contextmanager
def worker(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], httpx.Client]]:
    """`procure gpu-worker` as a real process, as an instance runs it."""
    port = free_port()
    full = {
        **os.environ,
        "GPU_WORKER_TOKEN": TOKEN,
        "GPU_WORKER_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "OLLAMA_URL": "",
        "ORCHESTRATOR_URL": "",
        "GPU_WORKER_ON_ORPHAN": "",
        **env,
    }
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [PY, "-m", "procure.cli", "gpu-worker", "--port", str(port)],
        env=full,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=15) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.get("/healthz")
                    break
                except httpx.TransportError:
                    assert process.poll() is None, (tmp_path / "worker.log").read_text()
                    assert time.monotonic() < deadline, "the worker never answered"
                    time.sleep(0.1)
            yield process, client
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        log.close()


def _job_pid(client: httpx.Client, command: list[str]) -> tuple[dict[str, Any], int]:
    answer = client.post("/jobs", json={"command": command})
    assert answer.status_code == 201, answer.text
    job = answer.json()
    deadline = time.monotonic() + 30
    while True:
        page = client.get(f"/jobs/{job['id']}/logs").json()
        if page["lines"]:
            return job, int(page["lines"][0]["text"])
        assert time.monotonic() < deadline, "the job never printed its pid"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (reaped by init soon).
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_pid(pid: int) -> None:
    """Clean up a job process this test started (by its id, and only that one)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def test_a_stalled_client_cannot_keep_a_stopping_node_and_its_job_running(tmp_path: Path) -> None:
    """Before the fix: `procure gpu-worker` runs uvicorn without `timeout_graceful_shutdown`
    (cli/gpu.py), so one client that sent half a request holds SIGTERM's graceful stop forever: the
    lifespan that stops jobs ("no job outlives it", docs/gpu-node.md) never runs and the job keeps
    the GPU."""
    pid = 0
    with worker(tmp_path) as (process, client):
        try:
            _job, pid = _job_pid(client, [PY, "-c", HOLD])
            port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
            # A slow (or hostile) client: headers and half its body, then nothing.
            stalled = socket.create_connection(("127.0.0.1", port))
            stalled.sendall(
                b"POST /gpu-check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"agent_id"'
            )
            client.get("/healthz")  # the server has gone round its loop: it holds that request
            process.send_signal(signal.SIGTERM)
            stopped = _gone_within(pid, 20)
            stalled.close()
            assert stopped, "SIGTERM did not stop the job while one client was slow"
        finally:
            if pid:
                _kill_pid(pid)


def test_a_node_killed_hard_takes_its_job_with_it(tmp_path: Path) -> None:
    """Before the fix: jobs run in their own session (`start_new_session=True`, jobs.py `_execute`)
    and nothing ties them to the node's life: a node killed with SIGKILL (OOM killer, crash) leaves
    the job running, holding the GPU, while the restarted node says 404 and the client resumes it
    elsewhere, so two copies run. (Fix: PR_SET_PDEATHSIG, or record each job's process group under
    the checkpoint root and kill what is left at start-up.)"""
    pid = 0
    try:
        with worker(tmp_path) as (process, client):
            _job, pid = _job_pid(client, [PY, "-c", HOLD])
            process.kill()
            process.wait(timeout=30)
        assert _gone_within(pid, 20), "the job outlived its node (killed with SIGKILL)"
    finally:
        if pid:
            _kill_pid(pid)


# A stand-in docker client that checks a bind mount as docker does: its host side is an absolute
# path (anything else is a volume name, and "/" is not allowed in one: docker exits 125).
FAKE_DOCKER = """#!{python}
import sys
args = sys.argv[1:]
for flag, spec in zip(args, args[1:]):
    if flag == "-v":
        source = spec.split(":", 1)[0]
        if not source.startswith("/"):
            print(f"docker: Error response from daemon: invalid volume specification: {{spec!r}}")
            sys.exit(125)
print("ran", " ".join(args))
"""


@contextmanager
def node(tmp_path: Path, **env: Any) -> Iterator[httpx.Client]:
    """The node in-process, as tests/test_gpu_jobs.py runs it (fake NVML)."""
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "root"), **env
    )
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=15) as client:
            yield client
    finally:
        server.stop()


def _finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"the job never ended: {job}"
        time.sleep(0.05)


def test_an_image_job_with_a_file_url_checkpoint_dir_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the docs let `checkpointDir` be any fsspec URL, and `file://...` is local, so
    the runner mounts it into the container, but verbatim (`-v file:///x:file:///x`, jobs.py
    `_docker_argv`): docker refuses that mount and the job fails before it runs. The default folder
    works only because `job_dir` resolves it to a plain absolute path; `~/...` (the gateway's
    default root) breaks the same way."""
    monkeypatch.setenv("HOME", str(tmp_path))  # `~` below stays inside this test's folder
    fake = tmp_path / "docker"
    fake.write_text(FAKE_DOCKER.format(python=PY))
    fake.chmod(0o755)
    ended = {}
    with node(tmp_path, GPU_WORKER_DOCKER=str(fake)) as client:
        for folder in (f"file://{tmp_path}/ckpt", "~/.cache/procure/review9-ckpt"):
            body = {"image": "ghcr.io/acme/train:1", "command": ["train"], "checkpointDir": folder}
            answer = client.post("/jobs", json=body)
            assert answer.status_code == 201, answer.text
            job = _finished(client, answer.json()["id"])
            ended[folder] = (job["status"], job["error"])
    assert all(status == "completed" for status, _ in ended.values()), ended


def test_a_node_stopping_while_a_refresh_is_retried_unregisters(tmp_path: Path) -> None:
    """Before the fix: the node unregisters on a clean stop only when its state is "registered"
    (service.py lifespan). One refresh that met a 503 makes it "retrying" although the orchestrator
    still holds the entry, so a node stopped then leaves its capability registered, pointing at a
    dead URL the orchestrator keeps forwarding paid jobs to. (Fix: unregister once `accepted >
    0`.)"""
    orch = Orchestrator(secret="orch-secret")
    orchestrator = serve(mock_orchestrator(orch))
    try:
        settings = GpuWorkerSettings(
            ORCHESTRATOR_URL=orchestrator.url,
            ORCHESTRATOR_SECRET="orch-secret",
            CAPABILITY_NAME="agent-net-review9",
            CAPABILITY_URL="http://worker:9876",
            CAPABILITY_REFRESH_S=0.2,
            CAPABILITY_RETRY_MIN_S=30,
            GPU_WORKER_CHECKPOINT_DIR=str(tmp_path),
        )
        module = FakeNvml(two_gpus()).module()
        server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                deadline = time.monotonic() + 15
                while "agent-net-review9" not in orch.registered:
                    assert time.monotonic() < deadline, "never registered"
                    time.sleep(0.02)
                orch.fail_first = 10**9  # every later registration: 503 (it is restarting)
                while client.get("/healthz").json()["registration"]["state"] != "retrying":
                    assert time.monotonic() < deadline + 15, "the refresh never failed"
                    time.sleep(0.02)
                # While the refresh is retried, the orchestrator still routes to us.
                assert "agent-net-review9" in orch.registered
        finally:
            server.stop()
        assert orch.unregistered == ["agent-net-review9"], "a stopped node stayed registered"
    finally:
        orchestrator.stop()


def test_a_node_restarted_after_a_crash_takes_up_its_lease(
    tmp_path: Path,
) -> None:
    """Before the fix: the dead-man lease lives only in the node's memory (deadman.py): a node that
    crashes and is restarted (compose's `restart: unless-stopped`) comes back "idle", so if its
    controller died too the lease never lapses and the stop action never runs: the instance bills
    forever. (Fix: keep the lease's expiry on disk and re-arm from it at start.)"""
    marker = tmp_path / "stopped"
    action = {"GPU_WORKER_ON_ORPHAN": f"touch {marker}"}
    with worker(tmp_path, **action) as (process, client):
        taken = client.post("/lease", json={"ttl_s": 3, "holder": "fleet-1"})
        assert taken.status_code == 200 and taken.json()["state"] == "armed", taken.text
        process.kill()  # the node crashes (and its controller is gone: nobody renews)
        process.wait(timeout=30)
    assert not marker.exists()
    with worker(tmp_path, **action) as (_process, client):  # restarted by its supervisor
        deadline = time.monotonic() + 20
        while not marker.exists():
            lease = client.get("/lease").json()
            assert time.monotonic() < deadline, f"the lapsed lease never fired: {lease}"
            time.sleep(0.1)
