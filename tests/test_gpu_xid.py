"""XID errors end to end: the probe drains NVML's critical-XID events per GPU without blocking,
the node reports them in /gpu-check and as dcgm's DCGM_FI_DEV_XID_ERRORS, and the fleet monitor
flags the instance with its evidence."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleet_fakes import NODE_TOKEN, FakeCloud
from fleet_world import fleet
from gpu_fakes import FakeGpu, FakeNvml, two_gpus
from procure.fleet.controller import scan_once
from procure.gpu.probe import XidWatch, nvml_reader, read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve


def test_xid_events_are_counted_per_gpu_with_the_last_one() -> None:
    fake = FakeNvml(two_gpus())
    read = nvml_reader(fake.module())
    first = read()
    assert [(g.xid_errors, g.last_xid) for g in first.gpus] == [(0, None), (0, None)]
    fake.gpus[1].xid(79)
    fake.gpus[1].xid(48)
    second = read()
    assert [(g.xid_errors, g.last_xid) for g in second.gpus] == [(0, None), (2, 48)]
    assert [(g.xid_errors, g.last_xid) for g in read().gpus] == [(0, None), (2, 48)]  # kept


def test_xids_are_best_effort_never_an_error() -> None:
    # One GPU without events, and bindings without the event API at all: None, not an error.
    fake = FakeNvml([FakeGpu(uuid="GPU-a", events_supported=False), FakeGpu(uuid="GPU-b")])
    probe = nvml_reader(fake.module())()
    assert [(g.xid_errors, g.error) for g in probe.gpus] == [(None, None), (0, None)]
    bare = FakeNvml(two_gpus()).module()
    del bare.nvmlEventSetCreate
    probe = read_nvml(bare, XidWatch())
    assert probe.gpu_count == 2 and all(
        g.xid_errors is None and g.error is None for g in probe.gpus
    )
    # Without a watch the probe reads as before.
    assert read_nvml(FakeNvml(two_gpus()).module()).gpus[0].xid_errors is None


def test_the_node_reports_xids_in_gpu_check_and_metrics() -> None:
    fake = FakeNvml(two_gpus())
    settings = GpuWorkerSettings(GPU_WORKER_TOKEN=NODE_TOKEN, GPU_WORKER_NVML_CACHE_S=0)
    server = serve(create_gpu_worker_app(settings, read=nvml_reader(fake.module())))
    try:
        auth = {"Authorization": f"Bearer {NODE_TOKEN}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=10) as client:
            client.post("/gpu-check", json={"agent_id": "a"})  # the watch starts here
            fake.gpus[0].xid(31)
            gpus = client.post("/gpu-check", json={"agent_id": "a"}).json()["gpus"]
            assert [(g["xid_errors"], g["last_xid"]) for g in gpus] == [(1, 31), (0, None)]
            text = client.get("/metrics").text
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    xid = {s.labels["UUID"]: s.value for s in families["DCGM_FI_DEV_XID_ERRORS"].samples}
    assert xid == {"GPU-aaaa": 31, "GPU-bbbb": 0}  # dcgm's meaning: the last XID, 0 for none


def test_the_fleet_monitor_flags_an_xid_with_its_evidence(sqlite_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        sick, well = cloud.add(util=50), cloud.add(util=50)
        async with fleet(sqlite_url, cloud) as ctx:
            first = await scan_once(ctx)
            assert all(a["kind"] != "xid" for v in first.views for a in v.anomalies)
            cloud.xid(sick, 79)
            ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
            views = {v.id: v for v in (await scan_once(ctx)).views}
            assert {"kind": "xid", "evidence": "1 XID error(s) reported"} in views[sick].anomalies
            assert views[sick].latest is not None and views[sick].latest.xid_errors == 1
            assert all(a["kind"] != "xid" for a in views[well].anomalies)

    asyncio.run(body())
