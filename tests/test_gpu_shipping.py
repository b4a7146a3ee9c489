"""Shipping the GPU node: `procure gpu-worker` as a user (or the image's entry point) runs it, in
a real process, without a GPU; the Dockerfile and docker-compose.yml say what the README says."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from procure.local import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_worker_command_serves_and_stops_cleanly() -> None:
    port = free_port()
    env = {**os.environ, "GPU_WORKER_TOKEN": "t0k", "OLLAMA_URL": "", "ORCHESTRATOR_URL": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", "gpu-worker", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "the worker never answered"
                time.sleep(0.1)
        assert health.status_code == 200
        denied = httpx.post(f"{url}/gpu-check", json={"agent_id": "a"})
        assert denied.status_code == 401
        check = httpx.post(
            f"{url}/gpu-check", json={"agent_id": "a"}, headers={"Authorization": "Bearer t0k"}
        ).json()
        assert check["status"] == "success" and check["agent_id"] == "a"
        # No driver here: a plain reason; on a GPU machine, real figures.
        assert check["gpu_count"] > 0 or "NVIDIA" in check["reason"]
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells of it.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Finished server process" in output
    assert "Traceback" not in output and "t0k" not in output


def test_the_dockerfile_runs_the_same_command_as_an_unprivileged_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") == 2, "a build stage and a final stage"
    final = text.split("\nFROM ")[-1]
    assert 'ENTRYPOINT ["procure", "gpu-worker", "--host", "0.0.0.0", "--port", "9876"]' in final
    assert "USER 10001" in final and "useradd" in final
    assert "apt-get" not in final and "gcc" not in final  # no build tools in the final image
    assert "COPY --from=build /opt/procure /opt/procure" in final


def test_the_compose_file_runs_ollama_with_the_gpu_beside_the_worker() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ollama", "ollama-pull", "worker"}
    ollama_devices = services["ollama"]["deploy"]["resources"]["reservations"]["devices"]
    assert ollama_devices[0]["driver"] == "nvidia" and "gpu" in ollama_devices[0]["capabilities"]
    worker = services["worker"]
    assert worker["build"] == "." and worker["ports"] == ["9876:9876"]
    assert worker["environment"]["OLLAMA_URL"] == "http://ollama:11434"
    worker_devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert "utility" in worker_devices[0]["capabilities"]  # NVML inside the container
    assert "ollama_data" in compose["volumes"]


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not installed here"
)
def test_docker_compose_validates_the_file() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
