"""The Nodes page: each GPU node's latest figures (as the real fleet controller sampled them from
the real GPU node service) and its models (asked of the node's `GET /models` now), in a real
browser; a node that hangs costs the page only the short deadline."""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from fleet_fakes import NODE_TOKEN, FakeCloud, Node, serve_on
from fleet_world import fleet, scan_for
from gpu_fakes import FakeGpu, FakeNvml, OllamaBehaviour, mock_ollama
from procure.api.app import create_app
from procure.clouds.base import Instance
from procure.fleet.settings import FleetSettings
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import fleet_repo, open_store
from procure.web.nodes import nodes_view
from web_browser import Loop, chromium, console_errors, screenshot_dir


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


def add_ollama_node(cloud: FakeCloud, name: str, util: int) -> str:
    """An instance whose node runs the real GPU service with an Ollama (mocked) behind it."""
    n = len(cloud.instances_) + 1
    next(cloud._ids)  # keep the fake cloud's own numbering (and 127.0.0.N) unique
    instance_id, ip = f"i-{n:04d}", f"127.0.0.{n + 1}"
    gpu = FakeGpu(uuid=f"GPU-{n}", util=util, used_mb=7000)
    module = FakeNvml([gpu]).module()
    settings = GpuWorkerSettings(
        token=NODE_TOKEN,
        nvml_cache_s=0,
        on_orphan="true",
        orchestrator_url=None,
        ollama_url="http://ollama.test",
    )
    ollama = httpx.ASGITransport(app=mock_ollama(OllamaBehaviour()))
    app = create_gpu_worker_app(settings, read=lambda: read_nvml(module), ollama_transport=ollama)
    cloud.nodes[instance_id] = Node(gpu, serve_on(app, ip, cloud.node_port))
    cloud.instances_[instance_id] = Instance(
        instance_id, name, "active", "gpu_1x_a100", "us-east-1", ip, cloud.price
    )
    return instance_id


def test_nodes_page_shows_figures_and_models(
    sqlite_url: str, tmp_path: Path, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud = FakeCloud()
    plain = cloud.add(util=40, name="no-ollama")
    served = add_ollama_node(cloud, "inference", util=70)
    gone = cloud.add(util=10, name="gone-dark")
    cloud.nodes[gone].server.stop()  # the controller's scan finds it unreachable
    monkeypatch.setenv("LAMBDA_LABS_NODE_PORT", str(cloud.node_port))
    monkeypatch.setenv("LAMBDA_LABS_NODE_TOKEN", NODE_TOKEN)
    controller = fleet(sqlite_url, cloud)
    ctx = loop.run(controller.__aenter__())
    store = open_store(sqlite_url)
    settings = Settings(
        PROCURE_DATABASE_URL=sqlite_url,
        PROCURE_HOME=tmp_path / "home",
        X402_FACILITATOR_URL="http://127.0.0.1:9",
    )
    server = serve(create_app(settings, store))
    try:
        loop.run(scan_for(ctx, 2))
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = console_errors(page)
            page.goto(server.url + "/nodes")
            assert page.locator("section.node").count() == 3
            node = page.locator(f'section.node[data-instance="{served}"]')
            assert node.locator(".reach").inner_text() == "reachable"
            assert node.locator("dd.util").inner_text() == "70%"
            assert node.locator("dd.memory").inner_text() == "7,000 MiB"
            assert node.locator("dd.temp").inner_text().endswith("°C")
            assert node.locator("dd.power").inner_text().endswith(" W")
            assert node.locator("dd.xid").inner_text() == "—"  # the fake NVML reports none
            models = node.locator("tr.model").all_inner_texts()
            assert [m.split("\t")[0] for m in models] == [
                "codellama:34b-instruct-q4_K_M",
                "llama3.2:1b",
            ]
            assert "in VRAM · 6,321 MiB" in models[0] and "34B" in models[0]
            other = page.locator(f'section.node[data-instance="{plain}"]')
            assert other.locator("dd.util").inner_text() == "40%"
            assert "OLLAMA_URL" in other.locator(".models").inner_text()
            dark = page.locator(f'section.node[data-instance="{gone}"]')
            assert dark.locator(".reach").inner_text() == "unreachable"
            assert dark.locator(".unreachable .reason").inner_text().startswith("ConnectError")
            assert "Never seen reachable" in dark.locator(".last-seen").inner_text()
            assert dark.locator("dl.figures").count() == 0  # no row of "—" without a reason
            assert "unreachable at the last scan" in dark.locator(".models").inner_text()
            assert page.locator('nav a[aria-current="page"]').inner_text() == "Nodes"
            page.screenshot(path=str(screenshot_dir(tmp_path) / "nodes-page.png"), full_page=True)
            assert errors == []
        listed = {n["instance_id"]: n for n in httpx.get(server.url + "/api/nodes").json()}
        assert listed[served]["models"]["state"] == "ok"
        assert listed[served]["latest"]["gpu_util"] == 70
        assert listed[plain]["models"]["state"] == "not_configured"
        assert listed[gone]["models"]["state"] == "skipped"
    finally:
        server.stop()
        loop.run(controller.__aexit__(None, None, None))
        store.dispose()


def test_a_hanging_node_costs_only_the_deadline(sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    now = utcnow()
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            now,
            instance_id="i-hang",
            name=None,
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip="10.0.0.9",
            status="active",
            price_per_hour=1_290_000,
            launched_by=None,
            node_url="http://10.0.0.9:9876",  # as the fleet's scan checked it
        )
        fleet_repo.add_samples(
            s, [{"instance_id": "i-hang", "taken_at": now, "reachable": True, "gpu_util": 5.0}]
        )
    hang = FastAPI()

    @hang.get("/models")
    async def models() -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    started = time.monotonic()
    (node,) = asyncio.run(
        nodes_view(store, FleetSettings(), deadline_s=0.5, transport=httpx.ASGITransport(app=hang))
    )
    assert time.monotonic() - started < 5
    assert node["models"]["state"] == "error" and node["latest"]["gpu_util"] == 5.0
    store.dispose()


def test_an_unreachable_node_says_why_and_when_it_was_last_seen(
    db_url: str, tmp_path: Path
) -> None:
    store = open_store(db_url)
    seen = utcnow() - timedelta(minutes=20)
    lost = seen + timedelta(minutes=12)
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            seen - timedelta(hours=1),
            instance_id="i-dark",
            name="gone-dark",
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip="10.0.0.7",
            status="active",
            price_per_hour=1_290_000,
            launched_by=None,
        )
        fleet_repo.add_samples(
            s,
            [
                {"instance_id": "i-dark", "taken_at": seen, "reachable": True, "gpu_util": 50.0},
                {
                    "instance_id": "i-dark",
                    "taken_at": lost,
                    "reachable": False,
                    "error": "ConnectError: [Errno 111] Connection refused",
                },
            ],
        )
    settings = Settings(
        PROCURE_DATABASE_URL=db_url,
        PROCURE_HOME=tmp_path / "home",
        X402_FACILITATOR_URL="http://127.0.0.1:9",
    )
    server = serve(create_app(settings, store))
    try:
        page = httpx.get(server.url + "/nodes", timeout=20)
        assert page.status_code == 200
        (card,) = re.findall(r'<div class="unreachable">(.*?)</div>', page.text, re.S)
        text = " ".join(re.sub(r"<[^>]+>", " ", html.unescape(card)).split())
        assert "Unreachable at the last scan: ConnectError: [Errno 111] Connection refused" in text
        assert f"Last seen {seen:%Y-%m-%d %H:%M:%S} UTC, 12 min before the last scan." in text
        (node,) = httpx.get(server.url + "/api/nodes", timeout=20).json()
        assert node["latest"]["reachable"] is False
        assert node["last_seen_at"].startswith(f"{seen:%Y-%m-%dT%H:%M:%S}")
        assert node["unreachable_for_s"] == 720
    finally:
        server.stop()
        store.dispose()
