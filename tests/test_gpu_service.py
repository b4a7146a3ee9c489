"""The GPU worker over real HTTP on loopback: the seed's `/gpu-check` answer, the Ollama catalogue
(mock Ollama: healthy, failing, slow, garbage, down), dcgm-exporter metrics, the token, bounded
input and the NVML cache."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_fakes import FakeGpu, FakeNvml, OllamaBehaviour, mock_ollama, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import free_port, serve

TOKEN = "worker-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SEED_KEYS = {
    "status",
    "agent_id",
    "model_name",
    "vram_usage_mb",
    "total_models",
    "timestamp",
    "gpu_count",
}


@contextmanager
def worker(nvml: FakeNvml, *, ollama_url: str | None = None, **env: Any) -> Iterator[httpx.Client]:
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN=TOKEN, OLLAMA_URL=ollama_url, OLLAMA_TIMEOUT_S=1.5, **env
    )
    module = nvml.module()
    server = serve(
        create_gpu_worker_app(settings, read=lambda: read_nvml(module), hostname="node-7")
    )
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
            yield client
    finally:
        server.stop()


@pytest.fixture
def ollama() -> Iterator[tuple[str, OllamaBehaviour]]:
    behaviour = OllamaBehaviour(slow_s=4.0)
    server = serve(mock_ollama(behaviour))
    yield server.url, behaviour
    server.stop()


def test_gpu_check_answers_the_seeds_shape_from_ollama(ollama: tuple[str, Any]) -> None:
    with worker(FakeNvml(two_gpus()), ollama_url=ollama[0]) as client:
        answer = client.post("/gpu-check", json={"agent_id": "demo-agent"})
        alias = client.post("/agent-net", json={"agent_id": "demo-agent"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body.keys() >= SEED_KEYS
    assert body["status"] == "success" and body["agent_id"] == "demo-agent"
    assert body["model_name"] == "codellama:34b-instruct-q4_K_M"  # the one loaded
    assert body["vram_usage_mb"] == 6321 and body["total_models"] == 2
    assert body["gpu_count"] == 2 and isinstance(body["timestamp"], float)
    assert [g["uuid"] for g in body["gpus"]] == ["GPU-aaaa", "GPU-bbbb"]
    assert body["gpus"][1]["temperature_c"] == 71
    assert alias.status_code == 200 and alias.json().keys() >= SEED_KEYS
    assert alias.json()["model_name"] == body["model_name"]


def test_without_ollama_the_figures_come_from_nvml() -> None:
    with worker(FakeNvml(two_gpus())) as client:
        body = client.post("/gpu-check", json={"agent_id": "a"}).json()
        models = client.get("/models").json()
    assert body["source"] == "nvml" and body["model_name"] == "NVIDIA H100 80GB HBM3"
    assert body["vram_usage_mb"] == 6321 + 1000 and body["total_models"] == 0
    assert models["status"] == "not_configured" and "OLLAMA_URL" in models["error"]


def test_without_a_driver_the_worker_still_answers_plainly() -> None:
    with worker(FakeNvml(two_gpus(), init_error="NVMLError_LibraryNotFound")) as client:
        check = client.post("/gpu-check", json={"agent_id": "a"})
        health = client.get("/healthz")
        metrics = client.get("/metrics")
    assert check.status_code == 200
    body = check.json()
    assert body["gpu_count"] == 0 and body["gpus"] == []
    assert "no NVIDIA driver found" in body["reason"]
    assert health.json()["gpu_count"] == 0 and "no NVIDIA driver" in health.json()["reason"]
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    assert families["procure_gpus"].samples[0].value == 0
    assert families["DCGM_FI_DEV_GPU_UTIL"].samples == []


def test_the_catalogue_lists_pulled_and_loaded_models(ollama: tuple[str, Any]) -> None:
    with worker(FakeNvml(two_gpus()), ollama_url=ollama[0]) as client:
        models = client.get("/models").json()
    assert models["status"] == "ok" and models["total_models"] == 2
    assert [m["name"] for m in models["models"]] == ["codellama:34b-instruct-q4_K_M", "llama3.2:1b"]
    assert models["models"][0]["quantization_level"] == "Q4_K_M"
    (loaded,) = models["loaded"]
    assert loaded["size_vram_mb"] == 6321 and loaded["expires_at"] == "2025-06-25T10:05:00Z"


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("error", "model runner has unexpectedly stopped"),  # Ollama's own error envelope
        ("slow", "did not answer"),  # past OLLAMA_TIMEOUT_S
        ("garbage", "HTTP 502"),
    ],
)
def test_a_failing_ollama_is_a_degraded_answer(
    ollama: tuple[str, OllamaBehaviour], mode: str, says: str
) -> None:
    url, behaviour = ollama
    behaviour.mode = mode
    with worker(FakeNvml(two_gpus()), ollama_url=url) as client:
        models = client.get("/models")
        check = client.post("/gpu-check", json={"agent_id": "a"})
    assert models.status_code == 200
    assert models.json()["status"] == "degraded" and says in models.json()["error"]
    # The GPU check still answers, from NVML, saying what went wrong with Ollama.
    body = check.json()
    assert body["status"] == "success" and body["source"] == "nvml"
    assert body["gpu_count"] == 2 and says in body["ollama_error"]


def test_ollama_down_is_a_degraded_answer() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with worker(FakeNvml(two_gpus()), ollama_url=down) as client:
        models = client.get("/models").json()
    assert models["status"] == "degraded" and "did not answer" in models["error"]


def test_metrics_speak_dcgm_exporter_names_and_labels() -> None:
    gpus = [*two_gpus(), FakeGpu(uuid="GPU-cccc", fails="NVMLError_GpuIsLost")]
    with worker(FakeNvml(gpus)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}

    def by_uuid(name: str) -> dict[str, float]:
        return {s.labels["UUID"]: s.value for s in families[name].samples}

    assert by_uuid("DCGM_FI_DEV_GPU_UTIL") == {"GPU-aaaa": 37, "GPU-bbbb": 90}
    assert by_uuid("DCGM_FI_DEV_FB_USED") == {"GPU-aaaa": 6321, "GPU-bbbb": 1000}
    assert by_uuid("DCGM_FI_DEV_FB_FREE")["GPU-aaaa"] == 81559 - 6321
    assert by_uuid("DCGM_FI_DEV_GPU_TEMP") == {"GPU-aaaa": 54, "GPU-bbbb": 71}
    assert by_uuid("DCGM_FI_DEV_POWER_USAGE")["GPU-aaaa"] == pytest.approx(123.456)
    assert by_uuid("DCGM_FI_DEV_MEM_COPY_UTIL")["GPU-aaaa"] == 12
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in families
    sample = families["DCGM_FI_DEV_GPU_UTIL"].samples[1]
    assert sample.labels == {
        "gpu": "1",
        "UUID": "GPU-bbbb",
        "pci_bus_id": "",
        "device": "nvidia1",
        "modelName": "NVIDIA H100 80GB HBM3",
        "Hostname": "node-7",
        "DCGM_FI_DRIVER_VERSION": "550.54.15",
    }
    failing = {s.labels["gpu"]: s.value for s in families["procure_gpu_read_error"].samples}
    assert failing == {"0": 0, "1": 0, "2": 1}


def test_every_route_but_healthz_needs_the_token() -> None:
    with worker(FakeNvml(two_gpus())) as client:
        for method, path in [("POST", "/gpu-check"), ("POST", "/agent-net")] + [
            ("GET", p) for p in ("/models", "/metrics", "/lease")
        ]:
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
                denied = client.request(method, path, json={"agent_id": "a"}, headers=headers)
                assert denied.status_code == 401, path
                assert "bearer token" in denied.json()["error"] and TOKEN not in denied.text
        health = client.get("/healthz", headers={"Authorization": ""})
    assert health.status_code == 200 and TOKEN not in health.text


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({}, 422, "agent_id"),
        ({"agent_id": ""}, 422, "agent_id"),
        ({"agent_id": "   "}, 422, "agent_id"),
        ({"agent_id": 7}, 422, "agent_id"),
        ({"agent_id": "x" * 201}, 422, "agent_id"),
        (None, 422, "invalid request"),
    ],
)
def test_bad_bodies_are_4xx_in_the_error_envelope(
    body: dict[str, Any] | None, status: int, says: str
) -> None:
    with worker(FakeNvml(two_gpus())) as client:
        response = (
            client.post("/gpu-check", json=body)
            if body is not None
            else client.post("/gpu-check", content=b"agent_id=a")
        )
    assert response.status_code == status and says in response.json()["error"]


def test_oversized_and_deep_bodies_are_refused_before_parsing() -> None:
    with worker(FakeNvml(two_gpus())) as client:
        big = client.post("/gpu-check", content=b'{"agent_id": "' + b"a" * (2 << 20) + b'"}')
        deep = client.post("/gpu-check", content=b"[" * 100_000 + b"]" * 100_000)
        missing = client.get("/nope")
        still = client.post("/gpu-check", json={"agent_id": "after"})
    assert big.status_code == 413 and "too large" in big.json()["error"]
    assert deep.status_code in (400, 413) and "error" in deep.json()
    assert missing.status_code == 404 and "error" in missing.json()
    assert still.status_code == 200


def test_nvml_is_read_once_per_interval_however_many_requests() -> None:
    nvml = FakeNvml(two_gpus())
    with worker(nvml, GPU_WORKER_NVML_CACHE_S=60) as client:

        async def many() -> list[int]:
            async with httpx.AsyncClient(base_url=str(client.base_url), headers=AUTH) as c:
                calls: list[Callable[[], Any]] = [
                    lambda: c.post("/gpu-check", json={"agent_id": "a"}),
                    lambda: c.get("/metrics"),
                    lambda: c.get("/healthz"),
                ]
                answers = await asyncio.gather(*(calls[i % 3]() for i in range(30)))
                return [a.status_code for a in answers]

        assert asyncio.run(many()) == [200] * 30
    assert nvml.reads == 1


def test_blank_settings_count_as_unset() -> None:
    # docker compose passes `${VAR:-}` as "": that must not be a token "Bearer " matches.
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN="", GPU_WORKER_ON_ORPHAN="  ", ORCHESTRATOR_URL="", CAPABILITY_NAME=""
    )
    assert settings.token is None and settings.on_orphan is None
    assert settings.orchestrator_url is None and settings.capability_name.startswith("agent-net-")
