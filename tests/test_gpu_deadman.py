"""The node's dead-man switch over real HTTP: a lease that lapses runs the stop action (once, and
says why), renewals keep it quiet, it can be disarmed, it needs the token, and a broken or hanging
action neither stops the worker nor leaks the command."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_fakes import FakeNvml, eventually, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve

TOKEN = "lease-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def worker(**env: Any) -> Iterator[httpx.Client]:
    module = FakeNvml(two_gpus()).module()
    settings = GpuWorkerSettings(**env)
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
            yield client
    finally:
        server.stop()


def stop_action(marker: Path) -> str:
    # Appends, so a second firing would show as a second line.
    return f"echo orphaned >> {marker}"


def test_a_lapsed_lease_runs_the_stop_action_once_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="procure.gpu")
    marker = tmp_path / "stopped"
    action = stop_action(marker) + " # CLOUD_KEY=sk-very-secret"
    with worker(GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_ON_ORPHAN=action) as client:
        armed = client.post("/lease", json={"ttl_s": 0.3, "holder": "fleet-1"})
        assert armed.status_code == 200 and armed.json()["state"] == "armed"
        eventually(lambda: client.get("/lease").json()["exit_status"] is not None, "firing")
        lease = client.get("/lease").json()
        health = client.get("/healthz").json()
        time.sleep(0.3)  # a lapsed lease fires once, not again and again
        assert marker.read_text() == "orphaned\n"
        assert client.post("/gpu-check", json={"agent_id": "a"}).status_code == 200
    assert lease["state"] == "fired" and lease["exit_status"] == 0
    assert "fleet-1" in lease["fired_reason"] and "lapsed" in lease["fired_reason"]
    assert health["lease"]["state"] == "fired"
    logged = caplog.text
    assert "lease of fleet-1 lapsed" in logged
    assert "sk-very-secret" not in logged and "sk-very-secret" not in str(health)


def test_renewals_keep_the_node_alive_until_they_stop(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    with worker(GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_ON_ORPHAN=stop_action(marker)) as client:
        # 2 s of renewals, each well inside the lease: 6 s, so that a busy machine stalling a
        # renewal for a second or two does not let it lapse (1.5 s did, beside a CPU-heavy job).
        for _ in range(8):
            assert client.post("/lease", json={"ttl_s": 6.0, "holder": "fleet-1"}).is_success
            time.sleep(0.25)
        assert not marker.exists()
        eventually(marker.exists, "firing once renewals stop")


def test_a_disarmed_switch_does_not_fire(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    with worker(GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_ON_ORPHAN=stop_action(marker)) as client:
        client.post("/lease", json={"ttl_s": 0.4, "holder": "fleet-1"})
        disarmed = client.delete("/lease")
        assert disarmed.json()["state"] == "disarmed"
        time.sleep(0.8)  # twice the lease
        assert not marker.exists()
        assert client.get("/lease").json()["state"] == "disarmed"


def test_a_hanging_action_is_killed_and_the_worker_carries_on() -> None:
    with worker(
        GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_ON_ORPHAN="sleep 30", GPU_WORKER_ORPHAN_TIMEOUT_S=0.3
    ) as client:
        client.post("/lease", json={"ttl_s": 0.2, "holder": "fleet-1"})
        eventually(lambda: client.get("/lease").json()["exit_status"] == -1, "the kill")
        assert client.get("/healthz").status_code == 200


def test_leases_need_the_token_and_a_configured_action(tmp_path: Path) -> None:
    body = {"ttl_s": 5, "holder": "fleet-1"}
    action = stop_action(tmp_path / "stopped")
    with worker(GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_ON_ORPHAN=action) as client:
        assert client.post("/lease", json=body, headers={"Authorization": ""}).status_code == 401
        assert client.delete("/lease", headers={"Authorization": ""}).status_code == 401
    with worker(GPU_WORKER_ON_ORPHAN=action) as client:  # no token: anyone could shut it down
        refused = client.post("/lease", json=body)
        assert refused.status_code == 403 and "GPU_WORKER_TOKEN" in refused.json()["error"]
    with worker(GPU_WORKER_TOKEN=TOKEN) as client:  # off unless configured
        off = client.post("/lease", json=body)
        assert off.status_code == 409 and "GPU_WORKER_ON_ORPHAN" in off.json()["error"]
        assert client.get("/healthz").json()["lease"]["state"] == "off"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"ttl_s": 5},
        {"holder": "x"},
        {"ttl_s": -1, "holder": "x"},
        {"ttl_s": "soon", "holder": "x"},
        {"ttl_s": 5, "holder": ""},
        {"ttl_s": 1e12, "holder": "x"},
    ],
)
def test_bad_lease_bodies_are_422(tmp_path: Path, body: dict[str, Any]) -> None:
    action = stop_action(tmp_path / "stopped")
    with worker(GPU_WORKER_TOKEN=TOKEN, GPU_WORKER_ON_ORPHAN=action) as client:
        response = client.post("/lease", json=body)
        assert response.status_code == 422 and "invalid request" in response.json()["error"]
        assert client.get("/lease").json()["state"] == "idle"
