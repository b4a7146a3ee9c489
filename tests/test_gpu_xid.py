"""XID errors end to end: the probe drains NVML's critical-XID events per GPU without blocking,
the node reports them in /gpu-check and as dcgm's DCGM_FI_DEV_XID_ERRORS, and the fleet monitor
flags the instance with its evidence."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleet_fakes import NODE_TOKEN, FakeCloud
from fleet_world import fleet
from gpu_fakes import FakeGpu, FakeNvml, two_gpus
from procure.fleet.controller import scan_once
from procure.fleet.monitor import new_xids
from procure.gpu.probe import XidWatch, nvml_reader, read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve
from procure.store.fleet_tables import FleetSampleRow


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
            evidence = (
                "1 new XID error(s) in 1 min since the previous sample "
                "(1 in all since the node started)"
            )
            assert {"kind": "xid", "evidence": evidence} in views[sick].anomalies
            assert views[sick].latest is not None and views[sick].latest.xid_errors == 1
            assert all(a["kind"] != "xid" for a in views[well].anomalies)

    asyncio.run(body())


def test_an_xid_is_flagged_at_the_scan_that_sees_it_not_at_every_scan_after(
    sqlite_url: str,
) -> None:
    """The node's count is for its lifetime: one XID, then quiet scans, flags it once; a
    further XID flags it again, with how many are new and over which period."""

    async def body() -> None:
        cloud = FakeCloud()
        sick = cloud.add(util=50)
        async with fleet(sqlite_url, cloud) as ctx:

            async def xids() -> list[str]:
                ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
                (v,) = (await scan_once(ctx)).views
                return [a["evidence"] for a in v.anomalies if a["kind"] == "xid"]

            assert await xids() == []
            cloud.xid(sick, 79)
            flagged = [await xids() for _ in range(4)]
            assert flagged[0] == [
                "1 new XID error(s) in 1 min since the previous sample "
                "(1 in all since the node started)"
            ]
            assert flagged[1:] == [[], [], []]  # quiet scans: the old XID is not news
            cloud.xid(sick, 48)
            cloud.xid(sick, 31)
            assert await xids() == [
                "2 new XID error(s) in 1 min since the previous sample "
                "(3 in all since the node started)"
            ]
            assert await xids() == []

    asyncio.run(body())


def test_a_count_that_goes_down_is_a_restarted_node_whose_xids_are_all_new() -> None:
    def at(minute: int, xids: int | None, reachable: bool = True) -> FleetSampleRow:
        taken = datetime(2026, 1, 5, 12, minute, tzinfo=UTC)
        return FleetSampleRow(
            instance_id="i-1", taken_at=taken, reachable=reachable, xid_errors=xids
        )

    assert new_xids([at(0, 5), at(1, 5)]) is None
    assert new_xids([at(0, 5), at(1, 2)]) == (
        "2 new XID error(s) since the node restarted (2 in all since the node started)"
    )
    assert new_xids([at(0, 5), at(1, 0)]) is None  # restarted, nothing since
    # An unreachable scan in between: compared with the last count the node gave.
    assert new_xids([at(0, 1), at(1, None, reachable=False), at(3, 2)]) == (
        "1 new XID error(s) in 3 min since the previous sample (2 in all since the node started)"
    )
    assert new_xids([at(0, 3)]) == "3 XID error(s) reported (no earlier count to compare with)"
