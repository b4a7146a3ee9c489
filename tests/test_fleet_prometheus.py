"""Prometheus as the controller's figure source, against a mock Prometheus on loopback speaking
`/api/v1/query`: dcgm-exporter series land in the samples (matched by the `instance` label's
host = the instance's IP), an instance without series is unreachable, and an error answer or
garbage is recorded on every sample without crashing the scan."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from fleet_fakes import FakeCloud
from fleet_world import fleet
from procure.fleet.controller import scan_once
from procure.fleet.prometheus import host_of
from procure.local import serve


@dataclass
class MockPrometheus:
    mode: str = "ok"  # ok | error | garbage
    series: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)
    queries: list[str] = field(default_factory=list)

    def gpu(self, name: str, instance: str, gpu: str, value: float) -> None:
        self.series.setdefault(name, []).append((instance, gpu, value))


def mock_prometheus(prom: MockPrometheus) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/query")
    async def query(request: Request) -> Response:
        promql = request.query_params.get("query", "")
        prom.queries.append(promql)
        if prom.mode == "error":  # Prometheus's error envelope
            return JSONResponse(
                {"status": "error", "errorType": "bad_data", "error": "parse error"}, 400
            )
        if prom.mode == "garbage":
            return PlainTextResponse("<html>502 Bad Gateway</html>", 502)
        result = [
            {
                "metric": {"__name__": promql, "instance": inst, "gpu": gpu, "Hostname": "h"},
                "value": [1767225600.123, repr(value)],
            }
            for inst, gpu, value in prom.series.get(promql, [])
        ]
        return JSONResponse(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    return app


@pytest.fixture
def prom() -> Iterator[tuple[str, MockPrometheus]]:
    state = MockPrometheus()
    server = serve(mock_prometheus(state))
    yield server.url, state
    server.stop()


def test_figures_come_from_prometheus_matched_by_instance_label(
    sqlite_url: str, prom: tuple[str, MockPrometheus]
) -> None:
    url, state = prom

    async def body() -> None:
        cloud = FakeCloud()
        seen, unseen = cloud.add(util=5), cloud.add(util=5)
        target = f"{cloud.instances_[seen].ip}:9400"
        for gpu, util, temp, power, mem, xid in [
            ("0", 90, 60, 300.5, 1000, 0),
            ("1", 70, 75, 250, 500, 79),
        ]:
            state.gpu("DCGM_FI_DEV_GPU_UTIL", target, gpu, util)
            state.gpu("DCGM_FI_DEV_GPU_TEMP", target, gpu, temp)
            state.gpu("DCGM_FI_DEV_POWER_USAGE", target, gpu, power)
            state.gpu("DCGM_FI_DEV_FB_USED", target, gpu, mem)
            state.gpu("DCGM_FI_DEV_XID_ERRORS", target, gpu, xid)
        state.gpu("DCGM_FI_DEV_GPU_UTIL", "10.9.9.9:9400", "0", 1)  # not ours: ignored
        async with fleet(sqlite_url, cloud, prometheus_url=url) as ctx:
            result = await scan_once(ctx)
            views = {v.id: v for v in result.views}
            last = views[seen].latest
            assert last is not None and last.reachable
            # The nodes say 5 %: these figures are Prometheus's, aggregated like /gpu-check's.
            assert (last.gpu_util, last.temperature_c, last.power_w) == (80.0, 75.0, 550.5)
            assert (last.memory_used_mb, last.xid_errors) == (1500, 1)
            xid = "1 XID error(s) reported (no earlier count to compare with)"  # a first sample
            assert {"kind": "xid", "evidence": xid} in views[seen].anomalies
            missing = views[unseen].latest
            assert missing is not None and not missing.reachable
            assert {"kind": "unreachable", "evidence": missing.error} in views[unseen].anomalies
            assert "no series for 127.0.0." in (missing.error or "")
            assert cloud.lease(seen)["state"] == "armed"  # the node's dead-man lease is kept
        assert sorted(state.queries) == sorted(
            [
                "DCGM_FI_DEV_GPU_UTIL",
                "DCGM_FI_DEV_GPU_TEMP",
                "DCGM_FI_DEV_POWER_USAGE",
                "DCGM_FI_DEV_FB_USED",
                "DCGM_FI_DEV_XID_ERRORS",
            ]
        )

    asyncio.run(body())


@pytest.mark.parametrize(
    ("mode", "says"), [("error", "bad_data: parse error"), ("garbage", "not JSON")]
)
def test_an_error_answer_or_garbage_is_recorded_not_a_crash(
    sqlite_url: str, prom: tuple[str, MockPrometheus], mode: str, says: str
) -> None:
    url, state = prom
    state.mode = mode

    async def body() -> None:
        cloud = FakeCloud()
        instance = cloud.add(util=50)
        async with fleet(sqlite_url, cloud, prometheus_url=url) as ctx:
            result = await scan_once(ctx)
            (view,) = result.views
            assert view.id == instance and view.latest is not None
            assert not view.latest.reachable and says in (view.latest.error or "")
            assert (view.latest.error or "").startswith("Prometheus: ")

    asyncio.run(body())


def test_unset_or_blank_url_reads_the_nodes() -> None:
    from procure.fleet.settings import FleetSettings

    assert FleetSettings(FLEET_PROMETHEUS_URL="  ").prometheus_url is None
    assert (
        FleetSettings(FLEET_PROMETHEUS_URL="http://prom:9090").prometheus_url == "http://prom:9090"
    )


@pytest.mark.parametrize(
    ("label", "host"),
    [("10.0.0.5:9400", "10.0.0.5"), ("[fe80::1]:9400", "fe80::1"), ("node-7", "node-7"), ("", "")],
)
def test_instance_label_host(label: str, host: str) -> None:
    assert host_of(label) == host
