"""The GPU node against what escapes or goes stale: a job's daemon that left its process
group, a stop while the first registration is in flight, a loopback-bound node registering an
address the orchestrator cannot reach, and NVML figures gone stale reaching the fleet. Real HTTP
servers on loopback, real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from gpu_fakes import FakeNvml, eventually, in_process_node, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, serve

TOKEN = "h102-node-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PY = sys.executable
SECRET = "orch-secret"
NAME = "agent-net-h102"


# --- a job whose child leaves its process group (setsid, a daemon's double fork) --------------

# The job starts a daemon the classic way (fork, setsid, fork again; stdio to /dev/null), writes
# the daemon's pid where the test can read it, then goes on working (or ends, with `exit`).
DAEMONIZE = """
import os, sys, time
pidfile, then = sys.argv[1], sys.argv[2]
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(pidfile + ".tmp", pidfile)
        time.sleep(120)  # holds the GPU, as a data loader or an inference server would
    os._exit(0)
os.waitpid(first, 0)
while not os.path.exists(pidfile):
    time.sleep(0.01)
print("daemon started", flush=True)
if then == "work":
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has ended: only its exit status is left)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _daemon_pid(pidfile: Path) -> int:
    return int(eventually(lambda: pidfile.exists() and pidfile.read_text(), "the daemon started"))


def _kill(pid: int) -> None:
    """Clean up a process this test started (by its id, and only that one)."""
    if pid and _alive(pid):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _job_status(client: httpx.Client, job_id: str) -> str:
    return str(client.get(f"/jobs/{job_id}").json()["status"])


def test_cancelling_a_job_ends_the_daemon_it_started_in_its_own_session(tmp_path: Path) -> None:
    """Before the fix: cancel signals the job's process group only (jobs.py `cancel`,
    `_kill_if_running`); a child that called setsid (any daemon, a double-forked server) is in no
    such group, so it keeps running, and holding the GPU, after the job is reported cancelled."""
    pidfile = tmp_path / "daemon.pid"
    daemon = 0
    try:
        with in_process_node(
            TOKEN,
            GPU_WORKER_TOKEN=TOKEN,
            GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
            GPU_WORKER_JOB_CANCEL_GRACE_S=1,
        ) as (_server, client):
            body = {"command": [PY, "-c", DAEMONIZE, str(pidfile), "work"]}
            job = client.post("/jobs", json=body).json()
            daemon = _daemon_pid(pidfile)
            eventually(lambda: _job_status(client, job["id"]) == "running", "the job runs")
            assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
            eventually(lambda: _job_status(client, job["id"]) == "cancelled", "cancelled")
            eventually(lambda: not _alive(daemon), "the job's daemon ended with its cancel")
    finally:
        _kill(daemon)


def test_a_stopping_node_ends_the_daemons_its_jobs_started(tmp_path: Path) -> None:
    """Before the fix: a node that stops kills each job's process group (jobs.py `close`), so a
    daemon a job started in its own session outlives the node ("no job outlives it",
    docs/gpu-node.md) and keeps the instance's GPU busy, billing, after the node is gone."""
    pidfile = tmp_path / "daemon.pid"
    daemon = 0
    try:
        with in_process_node(
            TOKEN, GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt")
        ) as (_server, client):
            body = {"command": [PY, "-c", DAEMONIZE, str(pidfile), "work"]}
            assert client.post("/jobs", json=body).status_code == 201
            daemon = _daemon_pid(pidfile)
        eventually(lambda: not _alive(daemon), "the job's daemon ended with the node")
    finally:
        _kill(daemon)


def test_a_job_that_ends_takes_the_daemon_it_left_behind_with_it(tmp_path: Path) -> None:
    """Before the fix: when a job ends the runner kills what is left of its process group ("the job
    is over, so is the child", jobs.py `_watch`), but a daemon in its own session is left running:
    the next job finds the GPU taken, and nobody will ever end it."""
    pidfile = tmp_path / "daemon.pid"
    daemon = 0
    try:
        with in_process_node(
            TOKEN, GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt")
        ) as (_server, client):
            body = {"command": [PY, "-c", DAEMONIZE, str(pidfile), "exit"]}
            job = client.post("/jobs", json=body).json()
            daemon = _daemon_pid(pidfile)
            eventually(lambda: _job_status(client, job["id"]) == "completed", "the job ended")
            eventually(lambda: not _alive(daemon), "the daemon ended with its job")
    finally:
        _kill(daemon)


# --- a node stopped while its first registration is in flight --------------------------------


@contextmanager
def slow_orchestrator() -> Iterator[tuple[dict[str, Any], list[str], LocalServer, Any]]:
    """An orchestrator that takes a registration in (the entry is live from then on) but answers
    only once released: a busy one, or one whose answer is lost on the way back."""
    import threading

    registered: dict[str, Any] = {}
    unregistered: list[str] = []
    release = threading.Event()
    app = FastAPI()

    @app.post("/capability/register")
    async def register(request: Request) -> Response:
        if request.headers.get("authorization") != SECRET:
            return PlainTextResponse("invalid_authorization", 400)
        body = await request.json()
        registered[body["name"]] = body
        while not release.is_set():
            await asyncio.sleep(0.05)
        return PlainTextResponse("ok")

    @app.post("/capability/unregister")
    async def unregister(request: Request) -> Response:
        name = (await request.body()).decode()
        registered.pop(name, None)
        unregistered.append(name)
        return PlainTextResponse("ok")

    server = serve(app)
    try:
        yield registered, unregistered, server, release
    finally:
        release.set()
        server.stop()


def _registering_node(tmp_path: Path, orchestrator: str, **env: Any) -> LocalServer:
    settings = GpuWorkerSettings(  # type: ignore[call-arg]
        _env_file=None,
        ORCHESTRATOR_URL=orchestrator,
        ORCHESTRATOR_SECRET=SECRET,
        CAPABILITY_NAME=NAME,
        CAPABILITY_URL="http://worker:9876",
        GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        **env,
    )
    module = FakeNvml(two_gpus()).module()
    return serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))


def test_a_node_stopped_while_its_first_registration_is_in_flight_unregisters(
    tmp_path: Path,
) -> None:
    """Before the fix: the node unregisters on stop only once an answer said "accepted"
    (service.py lifespan, `accepted > 0`). Stopped while its first registration was in flight, it
    never unregisters, though the orchestrator took the entry: it keeps routing paid jobs to a
    node that is gone."""
    with slow_orchestrator() as (registered, unregistered, orchestrator, _release):
        node = _registering_node(tmp_path, orchestrator.url, ORCHESTRATOR_TIMEOUT_S=30)
        try:
            eventually(lambda: NAME in registered, "the orchestrator took the registration in")
        finally:
            node.stop()
        assert unregistered == [NAME] and NAME not in registered


def test_a_node_stopped_after_its_registration_got_no_answer_unregisters(tmp_path: Path) -> None:
    """Before the fix: a first registration that timed out (the orchestrator took it, its answer
    was late) leaves the node "retrying" with nothing accepted, and a node stopped then never
    unregisters the entry the orchestrator holds."""
    with slow_orchestrator() as (registered, unregistered, orchestrator, _release):
        node = _registering_node(
            tmp_path,
            orchestrator.url,
            ORCHESTRATOR_TIMEOUT_S=0.3,
            CAPABILITY_RETRY_MIN_S=60,
        )
        try:
            with httpx.Client(base_url=node.url, timeout=10) as client:
                eventually(
                    lambda: client.get("/healthz").json()["registration"]["state"] == "retrying",
                    "the first registration timed out",
                )
            assert NAME in registered
        finally:
            node.stop()
        assert unregistered == [NAME] and NAME not in registered


# --- a node bound to loopback, registering an address the orchestrator cannot reach ----------


def test_a_loopback_bound_node_does_not_register_an_address_nobody_can_reach(
    tmp_path: Path,
) -> None:
    """Before the fix: `procure gpu-worker` listens on 127.0.0.1 by default, yet registers the
    default CAPABILITY_URL http://<hostname>:<port> with a remote orchestrator: every job it
    forwards fails to connect, while /healthz says "registered" and nothing says why."""
    import subprocess

    from procure.local import free_port

    port = free_port()
    env = {
        **os.environ,
        "GPU_WORKER_TOKEN": TOKEN,
        "GPU_WORKER_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "OLLAMA_URL": "",
        "GPU_WORKER_ON_ORPHAN": "",
        "CAPABILITY_URL": "",
        "ORCHESTRATOR_URL": "http://orchestrator.invalid:8935",  # elsewhere, as orchestrators are
        "ORCHESTRATOR_SECRET": SECRET,
        "CAPABILITY_RETRY_MIN_S": "0.05",
        "CAPABILITY_RETRY_MAX_S": "0.2",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [PY, "-m", "procure.cli", "gpu-worker", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

                def registration() -> dict[str, Any] | None:
                    assert process.poll() is None, log_path.read_text()
                    try:
                        found: dict[str, Any] = client.get("/healthz").json()["registration"]
                    except httpx.TransportError:
                        return None
                    return found if found["attempts"] or found["last_error"] else None

                state = eventually(registration, "the node said how its registration went", 60)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
    assert state["state"] == "refused", state
    assert "--host 0.0.0.0" in state["last_error"] and "CAPABILITY_URL" in state["last_error"]
    assert "--host 0.0.0.0" in log_path.read_text()  # and the operator reads it at start


# --- NVML hung: the figures last read are not the GPUs' figures now ----------------------------


def _hanging_nvml(
    tmp_path: Path, timeout_s: float
) -> tuple[threading.Event, threading.Event, GpuWorkerSettings, Callable[[], Any]]:
    """A node's settings and an NVML read that blocks (as in the driver) once `hung` is set,
    until `released`: utilisation 37 % and 90 % when last read."""
    hung, released = threading.Event(), threading.Event()
    module = FakeNvml(two_gpus()).module()

    def read() -> Any:
        if hung.is_set():
            released.wait(120)  # NVML blocked in the driver
        return read_nvml(module)

    settings = GpuWorkerSettings(  # type: ignore[call-arg]
        _env_file=None,
        GPU_WORKER_TOKEN=TOKEN,
        GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        GPU_WORKER_NVML_CACHE_S=0,
        GPU_WORKER_NVML_TIMEOUT_S=timeout_s,
    )
    return hung, released, settings, read


def _fleet_reads(port: int, *, deadline_s: float) -> dict[str, Any]:
    """The node on `port` as the fleet's controller reads it (fleet/nodes.py `read_node`)."""
    from procure.clouds.base import Instance
    from procure.fleet.nodes import read_node
    from procure.httpbounds import bounded_client

    async def read() -> dict[str, Any]:
        instance = Instance("i-1", "n", "active", "gpu_2x_h100", "r", "127.0.0.1", 1, gpus=2)
        async with bounded_client(deadline_s=deadline_s) as client:
            return await read_node(client, instance, port, TOKEN, datetime.now(UTC))

    return asyncio.run(read())


def test_figures_from_before_nvml_hung_do_not_reach_the_fleet_as_current(tmp_path: Path) -> None:
    """Before the fix: while NVML hangs (a GPU fallen off the bus) the node keeps answering the
    figures it read before, each GPU marked failing (probe.py `CachedProbe._stalled`); the fleet's
    reading of the node (fleet/nodes.py `figures`) averages that old utilisation as the pool's
    current load, and /metrics exports it as current, so a dead node's last busy minute keeps
    driving scaling."""
    hung, released, settings, read = _hanging_nvml(tmp_path, timeout_s=0.5)

    def sample(port: int) -> dict[str, Any]:
        return _fleet_reads(port, deadline_s=10)

    try:
        server = serve(create_gpu_worker_app(settings, read=read))
        try:
            before = sample(server.port)
            hung.set()
            after = sample(server.port)
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
                metrics = client.get("/metrics").text
        finally:
            server.stop()
    finally:
        released.set()
    assert before["reachable"] and before["gpu_util"] == 63.5  # the figures while NVML answered
    assert after["reachable"] and after["gpus_failing"] == 2  # the node says NVML is failing...
    assert after["gpu_util"] is None, after  # ...and no old figure passes for the load now
    assert not [line for line in metrics.splitlines() if line.startswith("DCGM_FI_DEV_GPU_UTIL")]


# --- a node killed hard: what its job left in a session of its own ----------------------------


@contextmanager
def worker_process(tmp_path: Path) -> Iterator[tuple[Any, httpx.Client]]:
    """`procure gpu-worker` as a real process, as an instance runs it."""
    import subprocess

    from procure.local import free_port

    port = free_port()
    env = {
        **os.environ,
        "GPU_WORKER_TOKEN": TOKEN,
        "GPU_WORKER_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "OLLAMA_URL": "",
        "ORCHESTRATOR_URL": "",
        "GPU_WORKER_ON_ORPHAN": "",
    }
    with (tmp_path / "worker.log").open("a") as log:
        process = subprocess.Popen(
            [PY, "-m", "procure.cli", "gpu-worker", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10
            ) as client:

                def up() -> bool:
                    assert process.poll() is None, (tmp_path / "worker.log").read_text()
                    try:
                        return client.get("/healthz").status_code == 200
                    except httpx.TransportError:
                        return False

                eventually(up, "the worker answered", 60)
                yield process, client
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def test_a_node_restarted_after_a_hard_kill_ends_the_daemon_its_job_left(tmp_path: Path) -> None:
    """Before the fix: a node killed outright takes its job's own process with it (the parent-death
    signal) and, at its next start, kills the process group the job had recorded (nodestate.py
    `end_leftovers`); a daemon the job started in a session of its own is in neither, so it runs
    on, holding the GPU, on an instance whose node has forgotten it."""
    pidfile = tmp_path / "daemon.pid"
    daemon = 0
    try:
        with worker_process(tmp_path) as (process, client):
            body = {"command": [PY, "-c", DAEMONIZE, str(pidfile), "work"]}
            assert client.post("/jobs", json=body).status_code == 201
            daemon = _daemon_pid(pidfile)
            process.kill()  # OOM killer, a crash
            process.wait(timeout=30)
        with worker_process(tmp_path):  # restarted by its supervisor
            eventually(lambda: not _alive(daemon), "the restarted node ended the daemon")
    finally:
        _kill(daemon)


def test_a_job_is_on_record_before_its_first_instruction_runs(tmp_path: Path) -> None:
    """Before the fix: the node wrote a job's record (what its next start ends, should it die
    hard) only once the spawn had returned to its event loop; the job, running at once, could
    have started a daemon by then, and a node killed in between left a job nobody would end
    (seen in the suite: the restart above found no record and the daemon ran on)."""
    from procure.gpu import nodestate

    records = nodestate.state_dir(str(tmp_path / "ckpt")) / "jobs"
    seen = tmp_path / "seen"
    seen.mkdir()
    # The job's very first act: does the node's record of it exist yet?
    look = (
        'if [ -e "$1/$PROCURE_JOB_ID.json" ]; then echo on-record; else echo unrecorded; fi'
        ' > "$2/$PROCURE_JOB_ID"'
    )
    with in_process_node(
        TOKEN,
        GPU_WORKER_TOKEN=TOKEN,
        GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        GPU_WORKER_JOBS_MAX_RUNNING=8,
    ) as (_server, client):
        ids = []
        for _ in range(8):
            body = {"command": ["/bin/sh", "-c", look, "sh", str(records), str(seen)]}
            answer = client.post("/jobs", json=body)
            assert answer.status_code == 201, answer.text
            ids.append(answer.json()["id"])
        for job_id in ids:
            eventually(lambda j=job_id: _job_status(client, j) == "completed", "the job ended")
    assert {(seen / job_id).read_text().strip() for job_id in ids} == {"on-record"}


def test_a_loopback_bound_node_registers_with_an_orchestrator_beside_it_where_it_listens(
    tmp_path: Path,
) -> None:
    """Before the fix: with the orchestrator on the same machine and the node on loopback (the
    defaults), the node registered http://<hostname>:<port>; where the hostname does not name
    127.0.0.1 (Debian's 127.0.1.1, a cloud image's private address) nothing listens there, so
    every forwarded job failed while /healthz said "registered"."""
    from gpu_fakes import Orchestrator, mock_orchestrator
    from procure.local import free_port

    orch = Orchestrator(secret=SECRET)
    orchestrator = serve(mock_orchestrator(orch))
    try:
        settings = GpuWorkerSettings(  # type: ignore[call-arg]
            _env_file=None,
            ORCHESTRATOR_URL=orchestrator.url,
            ORCHESTRATOR_SECRET=SECRET,
            CAPABILITY_NAME=NAME,
            CAPABILITY_URL="",
            GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        )
        module = FakeNvml(two_gpus()).module()
        port = free_port()
        app = create_gpu_worker_app(
            settings,
            read=lambda: read_nvml(module),
            port=port,
            hostname="gpu-node-7.invalid",  # a hostname that is not where the node listens
            bind_host="127.0.0.1",
        )
        node = serve(app, port=port)
        try:
            eventually(lambda: NAME in orch.registered, "registered")
            url = orch.registered[NAME]["url"]
            # What the orchestrator does with it: forward a job there.
            reached = httpx.get(f"{url}/healthz", timeout=10)
        finally:
            node.stop()
    finally:
        orchestrator.stop()
    assert reached.status_code == 200 and reached.json()["registration"]["state"] == "registered"


def test_once_nvml_is_known_hung_the_fleet_hears_so_within_its_deadline(tmp_path: Path) -> None:
    """Before the fix: every request made while NVML hangs waits GPU_WORKER_NVML_TIMEOUT_S anew
    (probe.py `CachedProbe.get`), though the read it waits for is already known hung. With the
    defaults (10 s on the node, 5 s for the fleet, 10 s for a Prometheus scrape) no reader ever
    gets the answer "NVML does not answer": the fleet records a network timeout ("unreachable")
    for a GPU fallen off the bus, and the scrape that would export the read error fails."""
    hung, released, settings, read = _hanging_nvml(tmp_path, timeout_s=4)

    def sample(port: int) -> dict[str, Any]:
        return _fleet_reads(port, deadline_s=2)

    try:
        server = serve(create_gpu_worker_app(settings, read=read))
        try:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
                hung.set()
                first = client.get("/healthz").json()  # this one waits, and learns it is hung
                after = sample(server.port)
        finally:
            server.stop()
    finally:
        released.set()
    assert first["gpus_failing"] == 2 and "NVML did not answer" in first["reason"]
    assert after["reachable"], after  # the node answered: it is the GPUs that do not
    assert after["gpus_failing"] == 2
