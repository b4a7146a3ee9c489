"""`/metrics` in dcgm-exporter's names, units and labels (`gpu`, `UUID`, `device`, `modelName`,
`Hostname`), so dashboards and alerts written for dcgm-exporter work unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, Metric

from procure.gpu.probe import Gpu, Probe

LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]

# (name, help, the Gpu figure). All are gauges: prometheus-client would rename a counter
# to `..._total`, which is not dcgm-exporter's name, and PromQL's rate() works on either type.
FIELDS: list[tuple[str, str, Callable[[Gpu], float | None]]] = [
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", lambda g: g.utilization_gpu_pct),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "Memory utilization (in %).", lambda g: g.utilization_memory_pct),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", lambda g: g.memory_used_mb),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", lambda g: g.memory_free_mb),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", lambda g: g.temperature_c),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", lambda g: g.power_w),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        lambda g: g.energy_mj,
    ),
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", lambda g: g.sm_clock_mhz),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", lambda g: g.mem_clock_mhz),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.", lambda g: _xid(g)),
]


def _xid(gpu: Gpu) -> int | None:
    # dcgm's meaning: the last XID, 0 while none was seen; absent where XIDs are not watched.
    if gpu.xid_errors is None:
        return None
    return gpu.last_xid or 0


def exposition(probe: Probe, hostname: str) -> bytes:
    """The Prometheus text for one probe."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(probe, hostname))
    return generate_latest(registry)


class _Collector:
    def __init__(self, probe: Probe, hostname: str) -> None:
        self.probe = probe
        self.hostname = hostname

    def collect(self) -> Iterator[Metric]:
        gpus = [g for g in self.probe.gpus if g.uuid is not None]
        for name, doc, figure in FIELDS:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            for gpu in gpus:
                value = figure(gpu)
                if value is not None:
                    family.add_metric(self._labels(gpu), value)
            yield family
        # Ours, not dcgm-exporter's: how many GPUs NVML sees and which of them it cannot read.
        count = GaugeMetricFamily(
            "procure_gpu_count", "GPUs NVML reports (0: no driver).", labels=["Hostname"]
        )
        count.add_metric([self.hostname], self.probe.gpu_count)
        yield count
        failing = GaugeMetricFamily(
            "procure_gpu_read_error",
            "1 when NVML failed to read this GPU.",
            labels=["gpu", "Hostname"],
        )
        for gpu in self.probe.gpus:
            failing.add_metric([str(gpu.index), self.hostname], 1 if gpu.error else 0)
        yield failing

    def _labels(self, gpu: Gpu) -> list[str]:
        return [str(gpu.index), gpu.uuid or "", f"nvidia{gpu.index}", gpu.name or "", self.hostname]
