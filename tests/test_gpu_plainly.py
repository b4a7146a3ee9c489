"""`procure gpu-worker` on a machine without a GPU says so plainly (issue 21): on /healthz, on
/gpu-check and in its start-up line; with GPUs, it names them."""

from __future__ import annotations

import logging

import httpx
import pytest

from gpu_fakes import FakeNvml, two_gpus
from procure.gpu.probe import Probe, read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve

TOKEN = "worker-token-plain"
NO_NVML = "nvidia-ml-py is not installed, so NVML cannot be read"


def test_no_gpu_is_said_plainly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="procure.gpu.service")
    settings = GpuWorkerSettings(GPU_WORKER_TOKEN=TOKEN)
    server = serve(create_gpu_worker_app(settings, read=lambda: Probe(0, reason=NO_NVML)))
    try:
        with httpx.Client(base_url=server.url, timeout=15) as client:
            health = client.get("/healthz").json()
            check = client.post(
                "/gpu-check", json={"agent_id": "a"}, headers={"Authorization": f"Bearer {TOKEN}"}
            ).json()
    finally:
        server.stop()
    assert health["gpu"] == f"no GPU on this machine ({NO_NVML})"
    assert health["gpu_count"] == 0
    assert check["gpu"] == health["gpu"] and check["gpu_count"] == 0
    started = [r for r in caplog.records if r.getMessage().startswith("GPU node:")]
    assert started and started[0].levelno == logging.WARNING
    assert "no GPU on this machine" in started[0].getMessage()


def test_gpus_are_named() -> None:
    module = FakeNvml(two_gpus()).module()
    settings = GpuWorkerSettings(GPU_WORKER_TOKEN=TOKEN)
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        health = httpx.get(f"{server.url}/healthz", timeout=15).json()
    finally:
        server.stop()
    assert health["gpu"].startswith("2 GPU(s): ")
