"""The GPU node, second look: a cancelled image job's slot, a job reading the node's environment,
a failing stop action, a hung NVML, hostile orchestrator and node answers, a saved record nested
too deep, win probabilities out of range. Real HTTP servers on loopback, real processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from gpu_fakes import FakeNvml, eventually, in_process_node, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, free_port, serve

TOKEN = "review11-node-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PY = sys.executable
SECRET = "orch-secret"
NAME = "agent-net-review11"


def ended(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job once it has ended."""

    def job() -> dict[str, Any] | None:
        found: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        return found if found["status"] in ("completed", "failed", "cancelled") else None

    return eventually(job, f"job {job_id} ended")


# --- registration with an orchestrator that answers in a hostile charset ----------------------


def test_registration_survives_an_answer_in_an_undecodable_charset() -> None:
    """Before the fix: an orchestrator (or a proxy before it) that answered a registration with
    `charset=utf-16` and no byte-order mark made `response.text` raise UnicodeError, which killed
    the registration task: the node stayed "registering" forever and never retried."""
    seen: list[int] = []
    app = FastAPI()

    @app.post("/capability/register")
    async def register(request: Request) -> Response:
        seen.append(1)
        if len(seen) == 1:  # first: a 503 whose body cannot be decoded as it claims
            return Response(
                b"orchestrator starting",
                status_code=503,
                media_type="text/plain; charset=utf-16",
            )
        await request.body()
        return Response(b"ok", media_type="text/plain")

    @app.post("/capability/unregister")
    async def unregister() -> Response:
        return Response(b"ok")

    orchestrator = serve(app)
    try:
        with in_process_node(
            TOKEN,
            ORCHESTRATOR_URL=orchestrator.url,
            ORCHESTRATOR_SECRET=SECRET,
            CAPABILITY_NAME=NAME,
            CAPABILITY_URL="http://worker:9876",
            CAPABILITY_RETRY_MIN_S=0.05,
            CAPABILITY_RETRY_MAX_S=0.2,
        ) as (_, client):
            state = eventually(
                lambda: client.get("/healthz").json()["registration"]["state"] == "registered",
                "registered after an answer in a hostile charset",
                within_s=10,
            )
            assert state and len(seen) >= 2
    finally:
        orchestrator.stop()


# --- the job client against a node that answers hostile numbers ------------------------------


def _hostile_node(answer: bytes) -> LocalServer:
    app = FastAPI()

    @app.api_route("/jobs/{job_id}", methods=["GET"])
    async def status(job_id: str) -> Response:
        return Response(answer, media_type="application/json")

    return serve(app)


@pytest.mark.parametrize(
    "field",
    [
        b'"progress": 1' + b"0" * 400,
        b'"progress": 0.5, "startedAt": 1' + b"0" * 400,
        b'"progress": 0.5, "endedAt": 1e400',
    ],
)
def test_a_node_answering_numbers_beyond_a_float_is_a_node_job_error(field: bytes) -> None:
    """Before the fix: a job's progress or times as a number no float holds (an integer of 400
    digits) made the client raise OverflowError, which the gateway's poll does not catch (it
    catches NodeJobError), and 1e400 came back as an infinite time."""
    from procure.gpu.jobclient import NodeJobClient, NodeJobError

    body = b'{"id": "job_0123456789abcdef", "status": "running", ' + field + b"}"
    node = _hostile_node(body)

    async def ask() -> dict[str, Any]:
        async with NodeJobClient(node.url, TOKEN) as client:
            return await client.status("job_0123456789abcdef")

    try:
        with pytest.raises(NodeJobError):
            asyncio.run(ask())
    finally:
        node.stop()


# --- an image job's container still on the GPU when the next job starts ----------------------

# A stand-in docker: `run` starts the "container" in a session of its own (as dockerd runs it,
# outside the client's process group), proxies SIGTERM to it (which it ignores, as a training
# loop busy in CUDA may) and waits for it; `rm -f` takes the daemon's time, then kills it.
FAKE_DOCKER = """#!{python}
import os, signal, subprocess, sys, time
from pathlib import Path
STATE = Path({state!r})
# The container says it is there only once it ignores SIGTERM.
CONTAINER = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); "
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(600)"
)
args = sys.argv[1:]
if args[0] == "run":
    name = args[args.index("--name") + 1]
    container = None
    signal.signal(signal.SIGTERM, lambda *_: container and os.kill(container.pid, signal.SIGTERM))
    container = subprocess.Popen(
        [sys.executable, "-c", CONTAINER, str(STATE / (name + ".pid"))],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    sys.exit(container.wait())
if args[0] == "rm":
    pidfile = STATE / (args[-1] + ".pid")
    time.sleep(2)  # the daemon stops the container in its own time
    if pidfile.exists():
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        pidfile.unlink()
"""

# The next job: is the previous job's container still running when it starts?
PROBE_OVERLAP = """
import sys
pid = int(sys.argv[1])
try:
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
except OSError:
    state = "gone"
print("overlap" if state not in ("gone", "Z", "X") else "alone", flush=True)
"""


def _proc_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_cancelled_image_job_frees_its_slot_only_once_its_container_is_gone(
    tmp_path: Path,
) -> None:
    """Before the fix: cancel SIGKILLs a docker client that did not stop in its grace, and the
    slot was freed as soon as that client died, while `docker rm -f` ran in the background: the
    next queued job started with the first job's container still running on the GPU."""
    state = tmp_path / "containers"
    state.mkdir()
    fake = tmp_path / "docker"
    fake.write_text(FAKE_DOCKER.format(python=PY, state=str(state)))
    fake.chmod(0o755)
    container = 0
    with in_process_node(
        TOKEN,
        GPU_WORKER_TOKEN=TOKEN,
        GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        GPU_WORKER_DOCKER=str(fake),
        GPU_WORKER_DOCKER_GPUS="",
        GPU_WORKER_JOB_CANCEL_GRACE_S=0.3,
    ) as (_, client):
        try:
            first = client.post("/jobs", json={"image": "acme/train:1", "command": ["train"]})
            assert first.status_code == 201, first.text
            job_id = first.json()["id"]
            pidfile = state / f"procure-{job_id}.pid"
            eventually(pidfile.exists, "the first job's container started")
            container = int(pidfile.read_text())
            probe = [PY, "-c", PROBE_OVERLAP, str(container)]
            second = client.post("/jobs", json={"command": probe})
            assert second.status_code == 201 and second.json()["status"] == "queued"
            assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
            done = ended(client, second.json()["id"])
            lines = client.get(f"/jobs/{done['id']}/logs").json()["lines"]
            assert done["status"] == "completed", (done, lines)
            assert [line["text"] for line in lines] == ["alone"]
        finally:
            if container and _proc_alive(container):
                os.kill(container, 9)


# --- the node's secrets read by a job from the node's own environment ------------------------

ORPHAN_KEY = "lambda-api-key-review11-do-not-leak"
# A job reads its parent's (the node's) environment, as any process of the same user may.
READ_NODE_ENV = """
import os
try:
    seen = open(f"/proc/{os.getppid()}/environ", "rb").read().decode(errors="replace")
except OSError as exc:
    seen = f"refused: {exc.strerror}"
print(seen.replace("\\0", " "), flush=True)
"""


@contextmanager
def worker_process(tmp_path: Path, **env: str) -> Iterator[httpx.Client]:
    """`procure gpu-worker` as a real process. As root it runs without capabilities, as an
    instance runs it (an unprivileged user): its jobs are then the same user and no more."""
    port = free_port()
    full = {
        **os.environ,
        "GPU_WORKER_TOKEN": TOKEN,
        "GPU_WORKER_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
        "OLLAMA_URL": "",
        "ORCHESTRATOR_URL": "",
        **env,
    }
    argv = [PY, "-m", "procure.cli", "gpu-worker", "--port", str(port)]
    if os.geteuid() == 0:
        argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", *argv]
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(argv, env=full, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=15) as client:

            def up() -> bool:
                assert process.poll() is None, (tmp_path / "worker.log").read_text()
                try:
                    return client.get("/healthz").status_code == 200
                except httpx.TransportError:
                    return False

            eventually(up, "the worker answered", within_s=60)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


@pytest.mark.skipif(sys.platform != "linux", reason="/proc and prctl are Linux's")
@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv as root"
)
def test_a_job_cannot_read_the_node_token_or_stop_action_from_the_node_process(
    tmp_path: Path,
) -> None:
    """Before the fix: the runner gives a job only a few harmless variables, but the job runs as
    the node's user and could read them all from /proc/<node>/environ: the node's token and
    GPU_WORKER_ON_ORPHAN, which carries the cloud API key that terminates instances (on a
    gateway, the job is a buyer's)."""
    with worker_process(
        tmp_path, GPU_WORKER_ON_ORPHAN=f"LAMBDA_API_KEY={ORPHAN_KEY} true"
    ) as client:
        answer = client.post("/jobs", json={"command": [PY, "-c", READ_NODE_ENV]})
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["id"]
        job = ended(client, job_id)
        text = " ".join(line["text"] for line in client.get(f"/jobs/{job_id}/logs").json()["lines"])
    assert job["status"] == "completed", (job, text)
    assert ORPHAN_KEY not in text and TOKEN not in text
    assert "refused" in text


# --- a stop action that fails is tried again --------------------------------------------------


def test_a_stop_action_that_fails_is_tried_again_until_it_works(tmp_path: Path) -> None:
    """Before the fix: the dead-man switch ran its stop action once per lapse and kept no
    account of its exit status: a cloud API that was briefly unreachable when the lease lapsed
    (the action exits 1) left the orphaned instance running, and billing, for good."""
    from procure.gpu.deadman import DeadMan

    tries, stopped = tmp_path / "tries", tmp_path / "stopped"
    # Fails its first two runs (the API is down), then terminates the instance.
    action = (
        f"echo try >> {tries}; "
        f'[ "$(wc -l < {tries})" -ge 3 ] || exit 1; '
        f"echo terminated > {stopped}"
    )

    async def scenario() -> dict[str, Any]:
        switch = DeadMan(action, timeout_s=10, retry_s=0.1)
        watcher = asyncio.create_task(switch.watch())
        try:
            switch.renew("fleet-1", 0.2)
            deadline = time.monotonic() + 30
            while not stopped.exists():
                assert time.monotonic() < deadline, f"never stopped: {switch.to_json()}"
                await asyncio.sleep(0.05)
            while switch.exit_status != 0:  # the run that terminated it has been counted
                assert time.monotonic() < deadline, switch.to_json()
                await asyncio.sleep(0.05)
            return switch.to_json()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    lease = asyncio.run(scenario())
    assert lease["state"] == "fired" and lease["exit_status"] == 0
    assert tries.read_text().count("try") == 3  # and not once more after it worked


# --- tickets --------------------------------------------------------------------------------


@pytest.mark.parametrize("fixed", [2**256, 2**300, -1])
def test_a_win_probability_no_uint256_holds_is_refused_not_judged(fixed: int) -> None:
    """Before the fix: `wins` compared the ticket's hash with any integer: a winProb of 2^256 or
    more (which no ticket can carry) called every ticket a winner, a negative one every ticket a
    loser, instead of saying the winProb is not a ticket's."""
    from procure.gpu.tickets import wins

    with pytest.raises(ValueError, match="256 bits"):
        wins(b"\x01" * 65, 12345, fixed)


# --- NVML that hangs (a GPU fallen off the bus) ----------------------------------------------


def test_a_hung_nvml_neither_stops_the_node_starting_nor_hangs_its_endpoints(
    tmp_path: Path,
) -> None:
    """Before the fix: every NVML read was awaited without a limit, the start-up one included. A
    GPU fallen off the bus makes NVML calls hang: the node never finished starting (so it never
    took up a lease a crashed run left, nor ran jobs), and /healthz, /gpu-check and /metrics
    hung with it instead of saying NVML does not answer."""
    import threading

    released = threading.Event()
    module = FakeNvml(two_gpus()).module()

    def hung_read() -> Any:
        released.wait(120)  # NVML blocked in the driver
        return read_nvml(module)

    settings = GpuWorkerSettings(  # type: ignore[call-arg]
        _env_file=None,
        GPU_WORKER_TOKEN=TOKEN,
        GPU_WORKER_CHECKPOINT_DIR=str(tmp_path / "ckpt"),
        GPU_WORKER_NVML_TIMEOUT_S=0.5,
    )
    try:
        server = serve(create_gpu_worker_app(settings, read=hung_read))
        try:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
                health = client.get("/healthz")
                check = client.post("/gpu-check", json={"agent_id": "a"})
                metrics = client.get("/metrics")
                job = client.post("/jobs", json={"command": [PY, "-c", "print('ran')"]})
        finally:
            server.stop()
    finally:
        released.set()
    assert health.status_code == 200 and "NVML did not answer" in health.json()["gpu"]
    assert check.status_code == 200 and "NVML did not answer" in check.json()["reason"]
    assert metrics.status_code == 200
    assert job.status_code == 201


# --- a refresh refused once, after the orchestrator had accepted us --------------------------


def test_a_refresh_refused_after_acceptance_is_retried_not_given_up() -> None:
    """Before the fix: any 4xx ended registration for good, refreshes included. The orchestrator
    had accepted this very request before, so a 404 from its proxy while it restarted (or a
    401 while its secret was being rotated back) is not our misconfiguration: yet the node
    stopped registering, and the restarted orchestrator never learnt it again."""
    answers = ["ok", "404", "404", "ok", "ok"]
    accepted: list[int] = []
    app = FastAPI()

    @app.post("/capability/register")
    async def register(request: Request) -> Response:
        await request.body()
        said = answers.pop(0) if answers else "ok"
        if said == "404":
            return Response(b"404 page not found", status_code=404)
        accepted.append(1)
        return Response(b"ok")

    @app.post("/capability/unregister")
    async def unregister() -> Response:
        return Response(b"ok")

    orchestrator = serve(app)
    try:
        with in_process_node(
            TOKEN,
            ORCHESTRATOR_URL=orchestrator.url,
            ORCHESTRATOR_SECRET=SECRET,
            CAPABILITY_NAME=NAME,
            CAPABILITY_URL="http://worker:9876",
            CAPABILITY_REFRESH_S=0.1,
            CAPABILITY_RETRY_MIN_S=0.05,
            CAPABILITY_RETRY_MAX_S=0.2,
        ) as (_, client):
            eventually(lambda: len(accepted) >= 3, "registered again after the 404s", 15)
            eventually(
                lambda: client.get("/healthz").json()["registration"]["state"] == "registered",
                "shown registered",
                15,
            )
    finally:
        orchestrator.stop()


# --- a record on disk nested too deep ---------------------------------------------------------


@pytest.mark.parametrize("record", ["lease.json", "jobs/job_0123456789abcdef.json"])
def test_a_node_whose_saved_record_is_nested_too_deep_still_starts(
    tmp_path: Path, record: str
) -> None:
    """Before the fix: a broken record is meant to be no record, but one nested deeper than
    Python's recursion limit (the state folder sits in the checkpoint root, which every job may
    write) raised RecursionError at start: the node never started, so it ran no job and never
    took up its lease."""
    path = tmp_path / "ckpt" / ".procure-node" / record  # worker_process's checkpoint root
    path.parent.mkdir(parents=True)
    path.write_text("[" * 30_000 + "]" * 30_000)
    # A real process: the test process has imported py_ecc, which raises the recursion limit.
    with worker_process(tmp_path, GPU_WORKER_ON_ORPHAN="true") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/lease").json()["state"] == "idle"


# --- a log page whose cursor goes back, or past what a node can be asked --------------------


@pytest.mark.parametrize("following", ["3", "true", "-1", str(2**31), str(2**60)])
def test_a_log_page_whose_next_is_not_a_cursor_forward_is_a_node_job_error(following: str) -> None:
    """Before the fix: the client handed back any integer as the next cursor: one before the
    page asked for (or a JSON `true`, or negative) made its caller read and relay the same lines
    again, and one past 2^31 - 1 fails the gateway's write of its log cursor (an INTEGER
    column) in every poll, and past 2^53 every later call is refused by the node (422)."""
    from procure.gpu.jobclient import NodeJobClient, NodeJobError

    app = FastAPI()

    @app.get("/jobs/{job_id}/logs")
    async def logs(job_id: str) -> Response:
        body = '{"lines": [{"seq": 11, "text": "step 11"}], "next": %s, "done": false}'
        return Response((body % following).encode(), media_type="application/json")

    node = serve(app)

    async def ask() -> dict[str, Any]:
        async with NodeJobClient(node.url, TOKEN) as client:
            return await client.logs("job_0123456789abcdef", after=10)

    try:
        with pytest.raises(NodeJobError):
            asyncio.run(ask())
    finally:
        node.stop()
