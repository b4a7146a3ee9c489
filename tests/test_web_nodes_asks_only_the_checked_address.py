"""The Nodes page asks a node's models at the address the fleet checked to be the instance's own
(on RunPod and Vast.ai the IP is shared between tenants and the cloud maps the node's port), and
where none is known it says so instead of sending the node token to the IP's other ports."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI, Request

from fleet_fakes import NODE_TOKEN, FakeCloud, Node, serve_on
from fleet_world import fleet
from gpu_fakes import FakeGpu, FakeNvml, OllamaBehaviour, mock_ollama
from procure.clouds.base import Instance
from procure.fleet.controller import scan_once
from procure.fleet.settings import FleetSettings
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, free_port
from procure.models import utcnow
from procure.store import fleet_repo, open_store
from procure.web.nodes import nodes_view


def neighbour(ip: str, port: int) -> tuple[LocalServer, list[str]]:
    """Another tenant's service on the shared IP, at the port the fleet's settings name: it
    keeps every Authorization header it is sent, and lists models of its own."""
    app, heard = FastAPI(), []

    @app.get("/models")
    async def models(request: Request) -> dict[str, Any]:
        heard.append(request.headers.get("authorization", ""))
        return {"status": "ok", "models": [{"name": "someone-elses:7b"}], "loaded": []}

    @app.post("/gpu-check")
    async def gpu_check(request: Request) -> dict[str, Any]:
        heard.append(request.headers.get("authorization", ""))
        return {"gpus": [{"utilization_gpu_pct": 99}]}

    return serve_on(app, ip, port), heard


def add_mapped_node(cloud: FakeCloud, ip: str) -> str:
    """An instance whose node (the real GPU service, with an Ollama behind it) answers at a port
    the cloud maps on the shared IP, as RunPod and Vast.ai list it (`node_url`)."""
    instance_id, port = "pod-0001", free_port()
    gpu = FakeGpu(uuid="GPU-pod", util=60, used_mb=5000)
    settings = GpuWorkerSettings(
        token=NODE_TOKEN,
        nvml_cache_s=0,
        on_orphan="true",
        orchestrator_url=None,
        ollama_url="http://ollama.test",
    )
    ollama = httpx.ASGITransport(app=mock_ollama(OllamaBehaviour()))
    module = FakeNvml([gpu]).module()
    app = create_gpu_worker_app(settings, read=lambda: read_nvml(module), ollama_transport=ollama)
    cloud.nodes[instance_id] = Node(gpu, serve_on(app, ip, port))
    cloud.instances_[instance_id] = Instance(
        instance_id,
        "inference",
        "active",
        "gpu_1x_a100",
        "us-east-1",
        ip,
        cloud.price,
        node_url=f"http://{ip}:{port}",
    )
    return instance_id


def test_a_mapped_port_node_is_asked_at_its_own_port_not_the_shared_ips(sqlite_url: str) -> None:
    """Before the fix: the page asked `ip:LAMBDA_LABS_NODE_PORT/models` with the node token even
    on a cloud that maps the node's port: on the shared IP that port was another tenant's
    service, which got the token and whose models the page showed as the instance's."""
    cloud, ip = FakeCloud(), "127.0.0.9"
    pod = add_mapped_node(cloud, ip)
    other, heard = neighbour(ip, cloud.node_port)

    async def body() -> list[dict[str, Any]]:
        async with fleet(sqlite_url, cloud) as ctx:
            ctx.mapped_ports = True  # RunPod, Vast.ai
            await scan_once(ctx)
            return await nodes_view(ctx.store, ctx.cfg)

    try:
        (node,) = asyncio.run(body())
    finally:
        other.stop()
    assert node["instance_id"] == pod and node["latest"]["reachable"], node
    assert heard == [], "the node token went to another tenant's port"
    assert node["models"]["state"] == "ok", node["models"]
    names = [m["name"] for m in node["models"]["models"]]
    assert "someone-elses:7b" not in names and "llama3.2:1b" in names, names


def test_an_address_the_latest_scan_did_not_check_is_not_asked(sqlite_url: str) -> None:
    """Before the fix: the page asked wherever the settings said, whatever the latest scan saw.
    Now the address must be one that scan checked: while the cloud's listing fails the pod may
    have been restarted, its mapped port given to another tenant, so the page does not ask."""
    cloud, ip = FakeCloud(), "127.0.0.13"
    add_mapped_node(cloud, ip)
    other, heard = neighbour(ip, cloud.node_port)

    async def body() -> tuple[dict[str, Any], dict[str, Any]]:
        async with fleet(sqlite_url, cloud) as ctx:
            ctx.mapped_ports = True
            await scan_once(ctx)
            (listed,) = await nodes_view(ctx.store, ctx.cfg)
            cloud.fail("instances", "provider")
            ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
            assert (await scan_once(ctx)).error  # the listing failed: nothing checked
            (stale,) = await nodes_view(ctx.store, ctx.cfg)
            return listed, stale

    try:
        listed, stale = asyncio.run(body())
    finally:
        other.stop()
    assert listed["models"]["state"] == "ok", listed["models"]
    assert heard == []
    assert stale["models"]["state"] == "skipped", stale["models"]
    assert "no address the fleet checked" in stale["models"]["error"]


def live_instance(
    store: Any, now: Any, instance_id: str, ip: str, node_url: str | None = None
) -> None:
    """An active fleet instance at `ip`, its node answering at the last scan; `node_url`: the
    address the fleet checked, if any."""
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            now,
            instance_id=instance_id,
            name=None,
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip=ip,
            status="active",
            price_per_hour=1_290_000,
            launched_by=None,
            node_url=node_url,
        )
        fleet_repo.add_samples(
            s, [{"instance_id": instance_id, "taken_at": now, "reachable": True}]
        )


def test_a_node_with_no_checked_address_is_not_asked(sqlite_url: str) -> None:
    """Before the fix: an instance the fleet knows no checked address of (a RunPod pod whose
    port the listing maps nowhere, a row from before the address was recorded) was asked at its
    IP and LAMBDA_LABS_NODE_PORT, the token sent to whatever listens there."""
    ip = "127.0.0.10"
    port = free_port()
    other, heard = neighbour(ip, port)
    store = open_store(sqlite_url)
    now = utcnow()
    live_instance(store, now, "pod-unmapped", ip)
    cfg = FleetSettings(_env_file=None, node_port=port, node_token=NODE_TOKEN)  # type: ignore[call-arg]
    try:
        (node,) = asyncio.run(nodes_view(store, cfg))
    finally:
        other.stop()
        store.dispose()
    assert heard == [], "the node token went to an address nobody checked"
    assert node["models"]["state"] == "skipped", node["models"]
    assert "no address the fleet checked" in node["models"]["error"]


def test_an_address_not_on_the_instances_ip_is_not_asked(sqlite_url: str) -> None:
    """A recorded address that names another host than the instance's IP (a row written by
    other means, or the IP changed since) is not trusted: the token goes nowhere."""
    ip, port = "127.0.0.11", free_port()
    other, heard = neighbour("127.0.0.12", port)
    store = open_store(sqlite_url)
    now = utcnow()
    live_instance(store, now, "pod-moved", ip, node_url=f"http://127.0.0.12:{port}")
    cfg = FleetSettings(_env_file=None, node_port=port, node_token=NODE_TOKEN)  # type: ignore[call-arg]
    try:
        (node,) = asyncio.run(nodes_view(store, cfg))
    finally:
        other.stop()
        store.dispose()
    assert heard == []
    assert node["models"]["state"] == "skipped", node["models"]
    assert "no address the fleet checked" in node["models"]["error"]
