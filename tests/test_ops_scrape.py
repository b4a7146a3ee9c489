"""The one rule for /metrics on every process: the scrape token (PROCURE_METRICS_TOKEN) or the
process's own token opens it; without either set it is open; a wrong or missing one is a 401 that
says nothing. Checked on `serve` and on `gpu-worker` over real HTTP; and the node exports whether
its dead-man lease lapsed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gpu_fakes import FakeNvml, two_gpus
from procure.api.app import create_app
from procure.gpu.probe import Probe, read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve
from procure.settings import Settings
from procure.store import open_store

SCRAPE, API = "scrape-0f3c", "api-77ab"


def fake_read() -> Callable[[], Probe]:
    module = FakeNvml(two_gpus()).module()
    return lambda: read_nvml(module)


def statuses(url: str) -> dict[str, int]:
    headers = {
        "none": {},
        "wrong": {"Authorization": "Bearer nope"},
        "scrape": {"Authorization": f"Bearer {SCRAPE}"},
        "own": {"Authorization": f"Bearer {API}"},
    }
    answers = {k: httpx.get(f"{url}/metrics", headers=h, timeout=15) for k, h in headers.items()}
    for answer in answers.values():
        assert SCRAPE not in answer.text and API not in answer.text
    return {k: a.status_code for k, a in answers.items()}


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ({"PROCURE_METRICS_TOKEN": SCRAPE, "PROCURE_API_TOKEN": API}, (401, 401, 200, 200)),
        ({"PROCURE_API_TOKEN": API}, (401, 401, 401, 200)),  # no scrape token: the API token
        ({"PROCURE_METRICS_TOKEN": SCRAPE}, (401, 401, 200, 401)),
        ({}, (200, 200, 200, 200)),  # neither: a loopback development set-up
    ],
)
def test_serve_metrics_follow_the_scrape_rule(
    tmp_path: Path, tokens: dict[str, str], expected: tuple[int, ...]
) -> None:
    url = f"sqlite:///{tmp_path / 'procure.db'}"
    store = open_store(url)
    settings = Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=tmp_path, **tokens)
    server = serve(create_app(settings, store))
    try:
        got = statuses(server.url)
        assert tuple(got.values()) == expected, got
        assert httpx.get(f"{server.url}/healthz", timeout=15).status_code == 200  # always open
    finally:
        server.stop()
        store.dispose()


@pytest.mark.parametrize(
    ("scrape", "own", "expected"),
    [
        (SCRAPE, API, (401, 401, 200, 200)),
        (None, API, (401, 401, 401, 200)),  # as before: the node's own token
        (None, None, (200, 200, 200, 200)),
    ],
)
def test_the_node_follows_the_same_rule(
    monkeypatch: pytest.MonkeyPatch, scrape: str | None, own: str | None, expected: tuple[int, ...]
) -> None:
    if scrape:
        monkeypatch.setenv("PROCURE_METRICS_TOKEN", scrape)
    else:
        monkeypatch.delenv("PROCURE_METRICS_TOKEN", raising=False)
    settings = GpuWorkerSettings(GPU_WORKER_TOKEN=own, GPU_WORKER_NVML_CACHE_S=0)
    node = serve(create_gpu_worker_app(settings, read=fake_read()))
    try:
        got = statuses(node.url)
        assert tuple(got.values()) == expected, got
        if own:  # the rest of the node still needs its own token, never the scrape token
            denied = httpx.post(
                f"{node.url}/gpu-check",
                json={"agent_id": "a"},
                headers={"Authorization": f"Bearer {SCRAPE}"},
                timeout=15,
            )
            assert denied.status_code == 401
    finally:
        node.stop()


def test_the_node_exports_whether_its_lease_lapsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCURE_METRICS_TOKEN", raising=False)
    settings = GpuWorkerSettings(
        GPU_WORKER_TOKEN=API, GPU_WORKER_ON_ORPHAN="true", GPU_WORKER_NVML_CACHE_S=0
    )
    app = create_gpu_worker_app(settings, read=fake_read(), hostname="n-7")
    node = serve(app)
    auth = {"Authorization": f"Bearer {API}"}
    try:
        text = httpx.get(f"{node.url}/metrics", headers=auth, timeout=15).text
        assert 'procure_node_lease_lapsed{Hostname="n-7"} 0' in text
        app.state.deadman.state = "fired"  # what a lapse leaves (the orphan action is mocked)
        text = httpx.get(f"{node.url}/metrics", headers=auth, timeout=15).text
        assert 'procure_node_lease_lapsed{Hostname="n-7"} 1' in text
    finally:
        node.stop()
