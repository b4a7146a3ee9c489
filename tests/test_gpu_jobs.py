"""The GPU node's job runner over real HTTP on loopback: examples/train.py as a real process,
progress and checkpoints from its lines, cancel, a crash, resume on a second node, idempotent
submission, bounded logs, one job at a time, the token, and no node secret in a job's env."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_fakes import FakeNvml, two_gpus
from procure.gpu import checkpoints
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve

TOKEN = "node-token-abc"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRAIN = [sys.executable, str(Path(__file__).parents[1] / "examples" / "train.py")]
PY = sys.executable


@contextmanager
def node(root: Path, token: str | None = TOKEN, **env: Any) -> Iterator[httpx.Client]:
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN=token,
        GPU_WORKER_CHECKPOINT_DIR=str(root),
        GPU_WORKER_JOB_CANCEL_GRACE_S=10,
        **env,
    )
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=15) as client:
            yield client
    finally:
        server.stop()


def wait_for(client: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool]) -> Any:
    deadline = time.monotonic() + 30
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job never got there: {job}"
        time.sleep(0.05)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def all_lines(client: httpx.Client, job_id: str) -> list[str]:
    lines: list[str] = []
    after = 0
    while True:
        page = client.get(f"/jobs/{job_id}/logs", params={"after": after}).json()
        lines += [line["text"] for line in page["lines"]]
        if not page["lines"]:
            return lines
        after = page["next"]


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = client.post("/jobs", json=body)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


def test_the_training_script_runs_reports_progress_and_checkpoints(tmp_path: Path) -> None:
    with node(tmp_path / "ckpt") as client:
        job = submit(
            client,
            command=[*TRAIN, "--steps", "30", "--step-time", "0", "--checkpoint-every", "10"],
        )
        assert job["status"] in ("queued", "running") and job["id"].startswith("job_")
        job = wait_for(client, job["id"], finished)
        lines = all_lines(client, job["id"])
    assert job["status"] == "completed", job
    assert job["progress"] == 1.0 and job["exitCode"] == 0 and job["error"] is None
    assert job["startedAt"] <= job["endedAt"]
    # The job wrote where the runner told it to: one folder per job under the node's root.
    assert job["checkpoint"] == str(tmp_path / "ckpt" / job["id"] / "step-000030.json")
    saved = json.loads(Path(job["checkpoint"]).read_text())
    assert saved["step"] == 30 and saved["loss"] < 10
    assert sorted(p.name for p in (tmp_path / "ckpt" / job["id"]).iterdir()) == [
        "step-000010.json",
        "step-000020.json",
        "step-000030.json",
    ]
    assert "step 1 loss" in lines[1] and lines[-1].startswith("done: w")


def test_cancel_midway_then_resume_on_another_node_from_its_checkpoint(tmp_path: Path) -> None:
    slow = [*TRAIN, "--steps", "300", "--step-time", "0.05", "--checkpoint-every", "5"]
    with node(tmp_path / "a") as first:
        job = submit(first, command=slow)
        job = wait_for(first, job["id"], lambda j: j["checkpoint"] is not None)
        assert 0 < job["progress"] < 1 and job["status"] == "running"
        cancelled = first.post(f"/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        job = wait_for(first, job["id"], finished)
        again = first.post(f"/jobs/{job['id']}/cancel").json()  # idempotent
        lines = all_lines(first, job["id"])
    assert job["status"] == "cancelled" and again["status"] == "cancelled"
    assert again["endedAt"] == job["endedAt"]
    assert any("(SIGTERM)" in line for line in lines)  # it checkpointed on its way out
    stopped_at = json.loads(Path(job["checkpoint"]).read_text())["step"]
    assert 0 < stopped_at < 300

    with node(tmp_path / "b") as second:  # another node, another checkpoint root
        resumed = submit(
            second,
            command=[*TRAIN, "--steps", "300", "--step-time", "0"],
            resumeFrom=job["checkpoint"],
        )
        # Until it writes its own, its checkpoint is the one it resumes from.
        assert resumed["checkpoint"] == resumed["resumeFrom"] == job["checkpoint"]
        resumed = wait_for(second, resumed["id"], finished)
        lines = all_lines(second, resumed["id"])
    assert resumed["status"] == "completed" and resumed["progress"] == 1.0
    assert lines[0].startswith(f"resumed from step {stopped_at} ")
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    assert steps == list(range(stopped_at + 1, 301))  # from where it was, nothing twice
    assert resumed["checkpoint"].startswith(str(tmp_path / "b"))
    assert resumed["checkpoint"].endswith("step-000300.json")


def test_a_job_killed_midway_fails_and_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    slow = [*TRAIN, "--steps", "200", "--step-time", "0.05", "--checkpoint-every", "5"]
    with node(tmp_path / "a") as first:
        job = submit(first, command=slow)
        job = wait_for(first, job["id"], lambda j: j["checkpoint"] is not None)
        pid = next(int(w.strip("()")) for w in all_lines(first, job["id"])[0].split() if ")" in w)
        os.kill(pid, signal.SIGKILL)  # a crash: no chance to checkpoint on the way out
        job = wait_for(first, job["id"], finished)
        failing = submit(first, command=[PY, "-c", "print('bad input'); raise SystemExit(3)"])
        failing = wait_for(first, failing["id"], finished)
    assert job["status"] == "failed" and job["exitCode"] == -9
    assert "killed by signal 9" in job["error"]
    assert failing["status"] == "failed" and failing["exitCode"] == 3
    assert failing["error"] == "exit code 3: bad input"
    saved = json.loads(Path(job["checkpoint"]).read_text())["step"]
    assert saved % 5 == 0 and 0 < saved < 200

    with node(tmp_path / "b") as second:
        resumed = submit(
            second,
            command=[*TRAIN, "--steps", "200", "--step-time", "0"],
            resumeFrom=job["checkpoint"],
        )
        resumed = wait_for(second, resumed["id"], finished)
        lines = all_lines(second, resumed["id"])
    assert resumed["status"] == "completed" and lines[0].startswith(f"resumed from step {saved} ")
    assert [int(t.split()[1]) for t in lines if t.startswith("step ")] == list(
        range(saved + 1, 201)
    )


def test_a_retried_submission_is_the_same_job_and_one_process(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    script = f"import os; open({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')"
    body = {"command": [PY, "-c", script], "idempotencyKey": "run-1/job-1"}
    answers: list[httpx.Response] = []
    with node(tmp_path / "ckpt") as client:

        def post() -> None:
            answers.append(client.post("/jobs", json=body))

        threads = [threading.Thread(target=post) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ids = {a.json()["id"] for a in answers}
        assert len(ids) == 1, [a.text for a in answers]
        wait_for(client, ids.pop(), finished)
        later = client.post("/jobs", json=body)
        other = client.post("/jobs", json=body | {"env": {"X": "1"}})
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 201]
    assert later.status_code == 200 and later.json()["status"] == "completed"
    assert len(marker.read_text().splitlines()) == 1  # one process, however many retries
    assert other.status_code == 409 and "idempotencyKey" in other.json()["error"]


def test_logs_are_bounded_pages_of_a_bounded_ring(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "for i in range(300): print(f'line {i}')\n"
        "sys.stdout.write('x' * 1_000_000)\n"
        "print()\n"
        "print('a' + 'é' * 500)\n"
        "print('last')\n"
    )
    with node(tmp_path, GPU_WORKER_JOB_LOG_LINES=50, GPU_WORKER_JOB_LINE_BYTES=100) as client:
        job = submit(client, command=[PY, "-c", script])
        job = wait_for(client, job["id"], finished)
        page = client.get(f"/jobs/{job['id']}/logs", params={"after": 0, "limit": 20}).json()
        rest = client.get(f"/jobs/{job['id']}/logs", params={"after": page["next"]}).json()
        empty = client.get(f"/jobs/{job['id']}/logs", params={"after": rest["next"]}).json()
        too_many = client.get(f"/jobs/{job['id']}/logs", params={"limit": 100_000})
    assert job["status"] == "completed"
    assert len(page["lines"]) == 20 and page["dropped"] == 253 and not page["done"]
    assert page["lines"][0] == {"seq": 254, "text": "line 253"}
    assert len(rest["lines"]) == 30 and rest["done"] and rest["dropped"] == 0
    assert rest["lines"][-1] == {"seq": 303, "text": "last"}
    texts = [line["text"] for line in page["lines"] + rest["lines"]]
    assert all(len(t.encode()) <= 100 + len(" …[cut]".encode()) for t in texts)
    assert texts[-3].startswith("x" * 100) and texts[-3].endswith("[cut]")
    assert texts[-2] == "a" + "é" * 49 + " …[cut]"  # cut at a character, not inside one
    assert empty["lines"] == [] and empty["next"] == rest["next"] and empty["done"]
    assert too_many.status_code == 422


def test_one_job_runs_at_a_time_and_jobs_see_no_node_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPU_WORKER_TOKEN", "the-node-secret")
    monkeypatch.setenv("ORCHESTRATOR_SECRET", "the-orchestrator-secret")
    show_env = "import os, json; print(json.dumps(dict(os.environ)))"
    with node(tmp_path) as client:
        first = submit(client, command=[PY, "-c", "import time; time.sleep(60)"])
        wait_for(client, first["id"], lambda j: j["status"] == "running")
        second = submit(client, command=[PY, "-c", show_env], env={"MY_VAR": "mine"})
        third = submit(client, command=[PY, "-c", "print('never')"])
        assert client.get(f"/jobs/{second['id']}").json()["status"] == "queued"
        dropped = client.post(f"/jobs/{third['id']}/cancel").json()
        assert dropped["status"] == "cancelled" and dropped["startedAt"] is None
        client.post(f"/jobs/{first['id']}/cancel")
        assert wait_for(client, first["id"], finished)["status"] == "cancelled"
        second = wait_for(client, second["id"], finished)
        env = json.loads(all_lines(client, second["id"])[0])
    assert second["status"] == "completed"
    assert env["MY_VAR"] == "mine" and env["PROCURE_JOB_ID"] == second["id"]
    assert env["PROCURE_CHECKPOINT_DIR"] == str(tmp_path / second["id"])
    assert "PROCURE_RESUME_FROM" not in env
    assert "GPU_WORKER_TOKEN" not in env and "ORCHESTRATOR_SECRET" not in env
    assert "the-node-secret" not in json.dumps(env)


def test_the_node_stopping_stops_its_jobs(tmp_path: Path) -> None:
    script = "import os, time; print(os.getpid(), flush=True); time.sleep(120)"
    with node(tmp_path) as client:
        job = submit(client, command=[PY, "-c", script])
        deadline = time.monotonic() + 30
        while not (lines := all_lines(client, job["id"])):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    pid = int(lines[0])
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "the job outlived its node"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_token_guards_every_job_route(tmp_path: Path) -> None:
    with node(tmp_path) as client:
        job = submit(client, command=[PY, "-c", "pass"])
        calls = [
            ("POST", "/jobs", {"command": ["true"]}),
            ("GET", f"/jobs/{job['id']}", None),
            ("GET", f"/jobs/{job['id']}/logs", None),
            ("POST", f"/jobs/{job['id']}/cancel", None),
            ("GET", "/jobs", None),
        ]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            with httpx.Client(base_url=client.base_url, headers=headers, timeout=15) as stranger:
                for method, path, body in calls:
                    answer = stranger.request(method, path, json=body)
                    assert answer.status_code == 401, (method, path, headers)
                    assert "bearer" in answer.json()["error"]
        assert len(client.get("/jobs").json()["jobs"]) == 1
    with node(tmp_path, token=None) as open_node:
        refused = open_node.post("/jobs", json={"command": [PY, "-c", "pass"]})
    assert refused.status_code == 403 and "GPU_WORKER_TOKEN" in refused.json()["error"]


BAD_SUBMISSIONS: list[tuple[dict[str, Any], str]] = [
    ({}, "command"),
    ({"image": "python:3.11"}, "docker"),
    ({"command": ["x"], "env": {"PROCURE_CHECKPOINT_DIR": "/x"}}, "PROCURE_"),
    ({"command": ["x"], "env": {"BAD NAME": "1"}}, "env"),
    ({"command": ["x"], "checkpointDir": "nosuch://bucket/x"}, "nosuch"),
    ({"command": ["x"], "resumeFrom": "with space"}, "spaces"),
    ({"command": ["x"] * 300}, "command"),
    ({"command": ["x" * 5_000]}, "command"),
    ({"command": ["x"], "image": "-v/:/host"}, "image"),
    ({"command": ["x"], "extra": 1}, "extra"),
]


def test_bad_submissions_are_refused_plainly(tmp_path: Path) -> None:
    with node(tmp_path, GPU_WORKER_DOCKER="procure-no-such-docker") as client:
        for body, words in BAD_SUBMISSIONS:
            answer = client.post("/jobs", json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert words in answer.json()["error"], (body, answer.text)
        assert client.get("/jobs").json()["jobs"] == []


def test_a_checkpoint_folder_that_loops_is_refused_plainly(tmp_path: Path) -> None:
    """Before the fix: a `checkpointDir` that is a loop of symlinks made resolving it raise
    RuntimeError, and the node answered a bare 500."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with node(tmp_path) as client:
        answer = client.post("/jobs", json={"command": ["x"], "checkpointDir": str(tmp_path / "a")})
        assert answer.status_code == 422, answer.text
        assert "checkpoint folder" in answer.json()["error"]
        assert client.get("/jobs").json()["jobs"] == []


def test_a_command_that_does_not_exist_fails_the_job(tmp_path: Path) -> None:
    with node(tmp_path) as client:
        job = submit(client, command=[str(tmp_path / "no-such-program")])
        job = wait_for(client, job["id"], finished)
        missing = client.get("/jobs/job_0123456789abcdef")
    assert job["status"] == "failed" and "could not start" in job["error"]
    assert missing.status_code == 404


def test_an_image_runs_through_docker_run_with_the_env_by_name(tmp_path: Path) -> None:
    # A stand-in docker client: it shows the arguments it got and the env it was given.
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "$*"\necho "secret=$MY_SECRET"\n')
    fake.chmod(0o755)
    with node(tmp_path / "ckpt", GPU_WORKER_DOCKER=str(fake)) as client:
        job = submit(
            client,
            image="ghcr.io/acme/train:1.2",
            command=["python", "train.py"],
            env={"MY_SECRET": "s3cr3t"},
        )
        job = wait_for(client, job["id"], finished)
        args, secret = all_lines(client, job["id"])
    folder = str(tmp_path / "ckpt" / job["id"])
    assert job["status"] == "completed" and job["image"] == "ghcr.io/acme/train:1.2"
    assert args == (
        f"run --gpus all --rm --name procure-{job['id']} -e MY_SECRET "
        f"-e PROCURE_CHECKPOINT_DIR -e PROCURE_JOB_ID -v {folder}:{folder} "
        "ghcr.io/acme/train:1.2 python train.py"
    )
    assert secret == "secret=s3cr3t"  # given to docker by name, never on its command line


def test_the_checkpoint_store_writes_whole_reads_bounded_and_names_missing_packages(
    tmp_path: Path,
) -> None:
    for url in (f"file://{tmp_path}/a/b/step-1.json", f"memory://{tmp_path.name}/step-1.json"):
        checkpoints.write_bytes(url, b'{"step": 1}')
        assert checkpoints.exists(url) and checkpoints.read_bytes(url) == b'{"step": 1}'
        with pytest.raises(checkpoints.CheckpointError, match="larger"):
            checkpoints.read_bytes(url, max_bytes=4)
    assert not list((tmp_path / "a" / "b").glob("*.partial"))
    for url, words in [("nosuch://x", "unknown"), ("a b", "spaces"), ("x" * 3_000, "2048")]:
        with pytest.raises(checkpoints.CheckpointError, match=words):
            checkpoints.check_url(url)
    assert checkpoints.job_dir(str(tmp_path / "root"), "job_1") == str(tmp_path / "root" / "job_1")
    assert checkpoints.job_dir("s3://bucket/runs/", "job_1") == "s3://bucket/runs/job_1"


def test_the_node_keeps_a_bounded_number_of_jobs(tmp_path: Path) -> None:
    sleep = [PY, "-c", "import time; time.sleep(60)"]
    with node(tmp_path, GPU_WORKER_JOBS_KEEP=2) as client:
        first = submit(client, command=sleep, idempotencyKey="first")
        second = submit(client, command=sleep)
        full = client.post("/jobs", json={"command": sleep})
        assert full.status_code == 429 and "unfinished" in full.json()["error"]
        for job in (first, second):
            client.post(f"/jobs/{job['id']}/cancel")
            wait_for(client, job["id"], finished)
        third = submit(client, command=[PY, "-c", "pass"])
        forgotten = client.get(f"/jobs/{first['id']}")
        kept = [j["id"] for j in client.get("/jobs").json()["jobs"]]
        # The oldest finished job is forgotten, not its key: a retry is told how it ended.
        again = client.post("/jobs", json={"command": sleep, "idempotencyKey": "first"})
    assert forgotten.status_code == 404 and kept == [second["id"], third["id"]]
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert again.json()["status"] == "cancelled"
