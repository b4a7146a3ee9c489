"""Both expositions against Prometheus' own checker and dcgm-exporter's reference: `promtool check
metrics` over `serve`'s /metrics (ticks of the in-process worker counted, outcome a fixed set,
counters typed counter) and `gpu-worker`'s /metrics (every counter of dcgm-exporter's default set
with its name, type and labels on simulated GPUs; what a GPU cannot give is absent, not 0)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_fakes import FakeNvml, two_gpus
from procure.agent import metrics
from procure.agent.worker import WorkerConfig
from procure.api.app import create_app
from procure.clouds.lambda_cloud.simnvml import SimGpu, sim_nvml
from procure.gateway import book
from procure.gpu.probe import nvml_reader, read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import serve
from procure.store import open_store
from prometheus_harness import eventually, promtool, running_prometheus
from world import World

# dcgm-exporter etc/default-counters.csv (the enabled lines): name -> Prometheus type.
DCGM_DEFAULT = {
    "DCGM_FI_DEV_SM_CLOCK": "gauge",
    "DCGM_FI_DEV_MEM_CLOCK": "gauge",
    "DCGM_FI_DEV_MEMORY_TEMP": "gauge",
    "DCGM_FI_DEV_GPU_TEMP": "gauge",
    "DCGM_FI_DEV_POWER_USAGE": "gauge",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "counter",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": "counter",
    "DCGM_FI_DEV_GPU_UTIL": "gauge",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "gauge",
    "DCGM_FI_DEV_ENC_UTIL": "gauge",
    "DCGM_FI_DEV_DEC_UTIL": "gauge",
    "DCGM_FI_DEV_XID_ERRORS": "gauge",
    "DCGM_FI_DEV_FB_FREE": "gauge",
    "DCGM_FI_DEV_FB_USED": "gauge",
    "DCGM_FI_DEV_FB_RESERVED": "gauge",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "counter",
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS": "gauge",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "counter",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "counter",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": "gauge",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "gauge",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "gauge",
    "DCGM_FI_PROF_DRAM_ACTIVE": "gauge",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "gauge",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "gauge",
}
DCGM_LABELS = {
    "gpu",
    "UUID",
    "pci_bus_id",
    "device",
    "modelName",
    "Hostname",
    "DCGM_FI_DRIVER_VERSION",
}


def promtool_lint(text: str) -> list[str]:
    """`promtool check metrics`' lint findings (it fails the test on anything it cannot parse)."""
    done = promtool("check", "metrics", stdin=text)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode in (0, 3), f"promtool could not read it: {problems}"  # 3: lint only
    assert (done.returncode == 3) == bool(problems), problems
    return problems


def reference_only(problems: list[str]) -> list[str]:
    """The findings that dcgm-exporter's own names cause (its camelCase `modelName` label, its
    counters without `_total`, `..._REPLAY_COUNTER`): dcgm-exporter's exposition draws the same
    ones, and dashboards query exactly these names. What is left is ours to fix."""
    allowed = {
        f"{n} label names should be written in 'snake_case' not 'camelCase'" for n in DCGM_DEFAULT
    }
    allowed |= {
        "DCGM_FI_DEV_FB_TOTAL label names should be written in 'snake_case' not 'camelCase'"
    }
    allowed |= {
        f'{n} counter metrics should have "_total" suffix'
        for n, kind in DCGM_DEFAULT.items()
        if kind == "counter"
    }
    allowed.add("DCGM_FI_DEV_PCIE_REPLAY_COUNTER metric name should not include type 'counter'")
    return [p for p in problems if p not in allowed]


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def types_of(text: str) -> dict[str, str]:
    return {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }


def gpu_metrics(read: Callable[[], Any], scrapes: int = 2) -> str:
    settings = GpuWorkerSettings(GPU_WORKER_NVML_CACHE_S=0)
    server = serve(create_gpu_worker_app(settings, read=read, hostname="node-7"))
    try:
        text = ""
        for _ in range(scrapes):  # GPM ratios come from two samples: the second scrape has them
            text = httpx.get(f"{server.url}/metrics", timeout=15).text
        return text
    finally:
        server.stop()


def test_gpu_worker_exports_dcgm_exporters_default_set_on_simulated_gpus() -> None:
    gpus = [
        SimGpu("NVIDIA H100 80GB HBM3", "GPU-busy", 81559, 700, busy=True),
        SimGpu("NVIDIA H100 80GB HBM3", "GPU-idle", 81559, 700, vgpu=True),
    ]
    text = gpu_metrics(nvml_reader(sim_nvml(lambda: gpus)))
    found, kinds = families(text), types_of(text)
    for name, kind in {**DCGM_DEFAULT, "DCGM_FI_DEV_FB_TOTAL": "gauge"}.items():
        assert kinds.get(name) == kind, name
        uuids = {s.labels["UUID"] for s in found[name].samples}
        expected = (
            {"GPU-idle"} if name == "DCGM_FI_DEV_VGPU_LICENSE_STATUS" else {g.uuid for g in gpus}
        )
        assert uuids == expected, name  # not a vGPU: no license status at all, never 0
    sample = found["DCGM_FI_DEV_GPU_UTIL"].samples[0]
    assert set(sample.labels) == DCGM_LABELS
    assert sample.labels["pci_bus_id"] == "00000000:18:00.0"
    assert sample.labels["DCGM_FI_DRIVER_VERSION"] == "550.127.05"
    assert (
        sample.labels["modelName"] == "NVIDIA H100 80GB HBM3"
        and sample.labels["device"] == "nvidia0"
    )

    def value(name: str, uuid: str) -> float:
        return next(s.value for s in found[name].samples if s.labels["UUID"] == uuid)

    assert value("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "GPU-busy") == pytest.approx(0.635)
    assert value("DCGM_FI_PROF_PCIE_RX_BYTES", "GPU-busy") == 2300 * 2**20  # a rate, bytes/s
    fb = ("FREE", "USED", "RESERVED")
    assert sum(value(f"DCGM_FI_DEV_FB_{k}", "GPU-busy") for k in fb) == 81559
    assert value("DCGM_FI_DEV_FB_TOTAL", "GPU-busy") == 81559
    assert reference_only(promtool_lint(text)) == []


def test_what_a_gpu_cannot_give_is_absent_not_zero() -> None:
    module = FakeNvml(two_gpus()).module()  # an older board: no extra fields, no GPM
    text = gpu_metrics(lambda: read_nvml(module), scrapes=1)
    found = families(text)
    for name in (
        "DCGM_FI_DEV_MEMORY_TEMP",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "DCGM_FI_DEV_FB_RESERVED",
    ):
        assert found[name].samples == [], name
    assert len(found["DCGM_FI_DEV_FB_TOTAL"].samples) == 2  # procure read it; now exported
    assert found["procure_gpus"].samples[0].value == 2
    assert reference_only(promtool_lint(text)) == []


def test_tick_outcomes_are_a_fixed_set_whatever_the_message() -> None:
    for message in (
        "Job running (47%)",
        "Payment in doubt until 2026-12-06T05:00:00+00:00 (cancelling)",
        "Slice not bought: vendor said <b>no</b>",
        "Tick error: ValueError",
        "something nobody wrote yet",
    ):
        assert metrics.outcome_of(message) in metrics.OUTCOME_LABELS
    assert metrics.outcome_of("Job running (47%)") == "job_running"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_serve_metrics_pass_promtool_and_count_the_workers_ticks(world: World) -> None:
    app = create_app(
        world.settings, world.store, worker=WorkerConfig(concurrency=2, poll_interval_s=0.05)
    )
    server = serve(app)

    def worker_ticks() -> str | None:
        text = httpx.get(f"{server.url}/metrics", timeout=15).text
        ticks = families(text)["procure_ticks"].samples
        counted = sum(s.value for s in ticks if s.labels["source"] == "worker")
        return text if counted >= 3 else None

    try:
        world.new_run()
        text = eventually(worker_ticks, "the in-process worker's ticks on /metrics")
    finally:
        server.stop()
    assert promtool_lint(text) == []  # procure's own names: not one finding
    found, kinds = families(text), types_of(text)
    outcomes = {s.labels["outcome"] for s in found["procure_ticks"].samples}
    assert outcomes <= set(metrics.OUTCOME_LABELS)
    assert kinds["procure_ticks_total"] == "counter"
    assert kinds["procure_paid_usd_total"] == "counter"  # a total only grows: a counter
    assert kinds["procure_runs_started_total"] == "counter"


# NVIDIA's dcgm-exporter Grafana dashboard (grafana/dcgm-exporter-dashboard.json), every panel's
# query with its template variables at "all", and the panels issue 23 found empty.
DASHBOARD = [
    'DCGM_FI_DEV_GPU_TEMP{instance=~".*", gpu=~".*"}',
    'avg(DCGM_FI_DEV_GPU_TEMP{instance=~".*", gpu=~".*"})',
    'DCGM_FI_DEV_POWER_USAGE{instance=~".*", gpu=~".*"}',
    'sum(DCGM_FI_DEV_POWER_USAGE{instance=~".*", gpu=~".*"})',
    'DCGM_FI_DEV_SM_CLOCK{instance=~".*", gpu=~".*"} * 1000000',
    'DCGM_FI_DEV_GPU_UTIL{instance=~".*", gpu=~".*"}',
    'DCGM_FI_DEV_FB_USED{instance=~".*", gpu=~".*"}',
    'DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{instance=~".*", gpu=~".*"}',
    "rate(DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL[30s])",
    "DCGM_FI_PROF_PCIE_TX_BYTES",
    "DCGM_FI_PROF_PCIE_RX_BYTES",
    "DCGM_FI_DEV_FB_USED / DCGM_FI_DEV_FB_TOTAL",
]


def test_gateway_metrics_pass_promtool(sqlite_url: str) -> None:
    """Before the fix: the gateway's income and instance costs were counters without `_total`,
    which `promtool check metrics` flags (the README says every exposition passes it)."""
    store = open_store(sqlite_url)
    try:
        text = "\n".join(book.prometheus_lines(store, "gw1")) + "\n"
    finally:
        store.dispose()
    assert promtool_lint(text) == []
    kinds = types_of(text)
    assert kinds["procure_gateway_income_usd_total"] == "counter", kinds
    assert kinds["procure_gateway_instance_cost_usd_total"] == "counter", kinds


def test_nvidias_dashboard_shows_data_from_a_real_prometheus(tmp_path: Path) -> None:
    gpus = [
        SimGpu("NVIDIA H100 80GB HBM3", "GPU-a", 81559, 700, busy=True),
        SimGpu("NVIDIA H100 80GB HBM3", "GPU-b", 81559, 700, busy=True),
    ]
    settings = GpuWorkerSettings(GPU_WORKER_NVML_CACHE_S=0)
    node = serve(create_gpu_worker_app(settings, read=nvml_reader(sim_nvml(lambda: gpus))))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: gpu\n    static_configs: [{{targets: ['127.0.0.1:{node.port}']}}]\n"
    )
    try:
        with running_prometheus(config, tmp_path) as prometheus:
            for promql in DASHBOARD:
                result = eventually(
                    lambda q=promql: prometheus.query(q), f"data for {promql}", within_s=60
                )
                if "gpu=~" in promql and not promql.startswith(("avg", "sum")):
                    assert {r["metric"]["gpu"] for r in result} == {"0", "1"}, promql  # legend
    finally:
        node.stop()
