"""A submission retried under its idempotency key after the node forgot the job (pushed out by
`GPU_WORKER_JOBS_KEEP` newer ones) is answered with that job's final state, never run again; the
keys kept so are bounded."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from gpu_fakes import FakeNvml, two_gpus
from procure.gpu.jobs import TERMINAL, JobRunner, Limits
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve

TOKEN = "node-token-retry"
PY = sys.executable


@contextmanager
def node(root: Path, keep: int) -> Iterator[httpx.Client]:
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_CHECKPOINT_DIR=str(root), GPU_WORKER_JOBS_KEEP=keep
    )
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=15) as client:
            yield client
    finally:
        server.stop()


def all_ended(client: httpx.Client) -> list[dict[str, Any]]:
    """The node's jobs, once none is still queued or running (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        jobs = client.get("/jobs").json()["jobs"]
        if all(j["status"] in TERMINAL for j in jobs):
            return jobs
        assert time.monotonic() < deadline, f"jobs never ended: {jobs}"
        time.sleep(0.05)


def test_a_paid_job_retried_after_the_node_forgot_it_is_not_run_again(tmp_path: Path) -> None:
    """Before the fix: `_make_room` dropped the idempotency key with the job it forgot: the
    same submission retried after two newer jobs (GPU_WORKER_JOBS_KEEP=2) started the job again
    (201, a new id): paid once, run twice."""
    runs = tmp_path / "runs.txt"
    paid = {
        "command": [PY, "-c", f"open({str(runs)!r}, 'a').write('ran\\n')"],
        "idempotencyKey": "payment-0xabc/job-1",
    }
    with node(tmp_path, keep=2) as client:
        first = client.post("/jobs", json=paid)
        assert first.status_code == 201, first.text
        all_ended(client)
        for n in range(2):  # pushes the paid job out of the node's memory
            assert client.post("/jobs", json={"command": [PY, "-c", f"print({n})"]}).is_success
            all_ended(client)
        assert client.get(f"/jobs/{first.json()['id']}").status_code == 404  # forgotten
        retried = client.post("/jobs", json=paid)
        other = client.post("/jobs", json=paid | {"command": [PY, "-c", "pass"]})
        all_ended(client)
    assert retried.status_code == 200, retried.text
    assert retried.json()["id"] == first.json()["id"]
    assert retried.json()["status"] == "completed" and retried.json()["exitCode"] == 0
    assert runs.read_text() == "ran\n"  # once
    # The key names that job still: another job under it is refused, as while it was held.
    assert other.status_code == 409 and "idempotencyKey" in other.json()["error"]


def test_the_keys_of_forgotten_jobs_are_bounded(tmp_path: Path) -> None:
    """Forgotten jobs' keys are kept up to `keep_keys`, the least recently asked for dropped
    first, and without the jobs' commands, environments or log lines."""

    async def body() -> JobRunner:
        runner = JobRunner(Limits(keep=1, keep_keys=3, checkpoint_root=str(tmp_path)))
        for n in range(6):
            job, new = runner.submit(
                command=[PY, "-c", "print('x' * 100)"],
                image=None,
                env={"BIG": "y" * 1000},
                resume_from=None,
                checkpoint_dir=None,
                key=f"k{n}",
            )
            assert new
            assert job.task is not None
            await job.task
            if n == 3:  # a retry of k1: asked again, kept the longest
                assert runner.submit(**_same("k1"))[1] is False
        return runner

    runner = asyncio.run(body())
    assert list(runner.ended_keys) == ["k1", "k3", "k4"]  # k5 is still held, k0 and k2 dropped
    for kept in runner.ended_keys.values():
        assert kept.argv == [] and kept.env == {} and not kept.lines and kept.status == "completed"
    assert list(runner.by_key) == ["k5"]


def _same(key: str) -> dict[str, Any]:
    return {
        "command": [PY, "-c", "print('x' * 100)"],
        "image": None,
        "env": {"BIG": "y" * 1000},
        "resume_from": None,
        "checkpoint_dir": None,
        "key": key,
    }
