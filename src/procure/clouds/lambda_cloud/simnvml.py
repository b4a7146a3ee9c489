"""A simulated NVML: a module with pynvml's names (what `gpu.probe.read_nvml` calls) whose
figures follow the work placed on the instance: a busy GPU runs near 100 %, hot and power-hungry,
an idle one sits at 0 %; a lost GPU raises NVML's own error. It answers every figure behind
dcgm-exporter's default counters (field values, PCIe, NVLink, remapped rows, GPM), and its
energy and NVLink totals grow with time as a real GPU's do."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20
RESERVED_MB = 512  # what the driver keeps for itself (nvmlMemory_v2's `reserved`)


@dataclass(frozen=True)
class SimGpu:
    name: str
    uuid: str
    memory_total_mb: int
    power_limit_w: int
    busy: bool = False
    lost: bool = False
    vgpu: bool = False  # a licensed vGPU inside a virtual machine (license status answered)


class NVMLError(Exception):
    pass


class NVMLError_GpuIsLost(NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


class NVMLError_NotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


class NVMLError_Timeout(NVMLError):
    def __str__(self) -> str:
        return "Timeout"


class _GpmMetricsGet:
    """pynvml's c_nvmlGpmMetricsGet_t, as plain attributes."""

    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [
            types.SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)
        ]


# NVML_GPM_METRIC_* id -> (busy, idle) value
_GPM = {1: (97.0, 0.0), 5: (63.5, 0.0), 10: (41.0, 0.2), 20: (850.0, 0.5), 21: (2300.0, 0.5)}


def sim_nvml(
    read: Callable[[], list[SimGpu]], clock: Callable[[], float] = time.monotonic
) -> types.ModuleType:
    """A pynvml-shaped module; `read` is called once per `nvmlInit` (one consistent snapshot per
    probe, as a real read of all GPUs happens within milliseconds)."""
    m = types.ModuleType("pynvml")
    snapshot: list[SimGpu] = []
    energy_mj: dict[str, float] = {}
    nvlink_kib: dict[str, float] = {}
    last = [clock()]

    def init() -> None:
        # The counters grow by what each GPU drew (and moved) since the last snapshot.
        now = clock()
        elapsed, last[0] = max(0.0, now - last[0]), now
        for g in snapshot:
            energy_mj[g.uuid] = energy_mj.get(g.uuid, 0.0) + power_mw(g) * elapsed
            nvlink_kib[g.uuid] = (
                nvlink_kib.get(g.uuid, 0.0) + ((40 << 20) if g.busy else 16) * elapsed
            )
        snapshot[:] = read()
        for g in snapshot:
            energy_mj.setdefault(g.uuid, 3_600_000.0)
            nvlink_kib.setdefault(g.uuid, 1024.0)

    def handle(index: int) -> SimGpu:
        return snapshot[index]

    def alive(g: SimGpu) -> SimGpu:
        if g.lost:
            raise NVMLError_GpuIsLost()
        return g

    def memory(g: SimGpu, version: int | None = None) -> types.SimpleNamespace:
        alive(g)
        used = int(g.memory_total_mb * 0.82) if g.busy else 412
        total = g.memory_total_mb
        if version is None:
            free = total - used
            return types.SimpleNamespace(total=total * MIB, used=used * MIB, free=free * MIB)
        free = g.memory_total_mb - used - RESERVED_MB
        return types.SimpleNamespace(
            version=version,
            total=g.memory_total_mb * MIB,
            reserved=RESERVED_MB * MIB,
            used=used * MIB,
            free=free * MIB,
        )

    def power_mw(g: SimGpu) -> int:
        return g.power_limit_w * (880 if g.busy else 90)

    def utilisation(g: SimGpu) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=98 if g.busy else 0, memory=61 if g.busy else 0)

    def field_values(g: SimGpu, ids: list[Any]) -> list[types.SimpleNamespace]:
        alive(g)
        answers = []
        for wanted in ids:
            field_id = wanted[0] if isinstance(wanted, tuple) else wanted
            value: dict[str, Any] = {"uiVal": 0, "ullVal": 0}
            kind = 1  # NVML_VALUE_TYPE_UNSIGNED_INT
            if field_id == 82:  # NVML_FI_DEV_MEMORY_TEMP
                value["uiVal"] = 81 if g.busy else 36
            elif field_id in (140, 141):  # NVLink raw tx / rx, KiB
                kind, value["ullVal"] = 3, int(nvlink_kib[g.uuid] / 2)
            else:
                answers.append(types.SimpleNamespace(fieldId=field_id, nvmlReturn=3))
                continue
            answers.append(
                types.SimpleNamespace(
                    fieldId=field_id,
                    nvmlReturn=0,
                    valueType=kind,
                    value=types.SimpleNamespace(**value),
                )
            )
        return answers

    def gpm_sample_get(g: SimGpu, sample: types.SimpleNamespace) -> types.SimpleNamespace:
        sample.busy = alive(g).busy
        return sample

    def gpm_metrics_get(request: _GpmMetricsGet) -> _GpmMetricsGet:
        busy = bool(getattr(request.sample2, "busy", False))
        for metric in request.metrics[: request.numMetrics]:
            values = _GPM.get(metric.metricId)
            metric.nvmlReturn = 0 if values else 3
            metric.value = values[0 if busy else 1] if values else 0.0
        return request

    def wait(_event_set: list[SimGpu], _timeout_ms: int) -> None:
        raise NVMLError_Timeout()  # no XID is ever simulated: nothing pending

    def licence(g: SimGpu) -> types.SimpleNamespace:
        feature = types.SimpleNamespace(featureCode=1, featureState=1)
        return types.SimpleNamespace(
            isGridLicenseSupported=1, licensableFeaturesCount=1, gridLicensableFeatures=[feature]
        )

    names: dict[str, object] = {
        "NVMLError": NVMLError,
        "NVMLError_GpuIsLost": NVMLError_GpuIsLost,
        "NVMLError_NotSupported": NVMLError_NotSupported,
        "NVMLError_Timeout": NVMLError_Timeout,
        "NVML_TEMPERATURE_GPU": 0,
        "NVML_CLOCK_SM": 1,
        "NVML_CLOCK_MEM": 2,
        "nvmlMemory_v2": 0x02000028,
        "NVML_GPM_METRICS_GET_VERSION": 1,
        "c_nvmlGpmMetricsGet_t": _GpmMetricsGet,
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "550.127.05",
        "nvmlDeviceGetCount": lambda: len(snapshot),
        "nvmlDeviceGetHandleByIndex": handle,
        "nvmlDeviceGetName": lambda g: g.name,
        "nvmlDeviceGetUUID": lambda g: g.uuid,
        "nvmlDeviceGetPciInfo": lambda g: types.SimpleNamespace(
            busId=f"00000000:{0x18 + 0x10 * snapshot.index(g):02X}:00.0".encode()
        ),
        "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetUtilizationRates": utilisation,
        "nvmlDeviceGetTemperature": lambda g, _sensor: 74 if g.busy else 33,
        "nvmlDeviceGetPowerUsage": power_mw,
        "nvmlDeviceGetEnforcedPowerLimit": lambda g: g.power_limit_w * 1000,
        "nvmlDeviceGetClockInfo": lambda g, clock: (
            (1410 if g.busy else 210) if clock == 1 else 1215
        ),
        "nvmlDeviceGetTotalEnergyConsumption": lambda g: int(energy_mj[alive(g).uuid]),
        "nvmlDeviceGetEncoderUtilization": lambda g: [0, 167000],
        "nvmlDeviceGetDecoderUtilization": lambda g: [12 if g.busy else 0, 167000],
        "nvmlDeviceGetPcieReplayCounter": lambda g: 0,
        "nvmlDeviceGetPcieThroughput": lambda g, counter: (
            (830_000 if counter == 0 else 2_250_000) if g.busy else 12
        ),
        "nvmlDeviceGetRemappedRows": lambda g: (0, 0, 0, 0),
        "nvmlDeviceGetFieldValues": field_values,
        "nvmlDeviceGetVirtualizationMode": lambda g: 2 if g.vgpu else 0,
        "nvmlDeviceGetGridLicensableFeatures": licence,
        "nvmlEventTypeXidCriticalError": 0x8,
        "nvmlEventSetCreate": lambda: [],
        "nvmlDeviceRegisterEvents": lambda g, _types, event_set: event_set.append(g),
        "nvmlEventSetWait": wait,
        "nvmlEventSetFree": lambda event_set: event_set.clear(),
        "nvmlGpmQueryDeviceSupport": lambda g: types.SimpleNamespace(isSupportedDevice=1),
        "nvmlGpmSampleAlloc": lambda: types.SimpleNamespace(busy=False),
        "nvmlGpmSampleGet": gpm_sample_get,
        "nvmlGpmMetricsGet": gpm_metrics_get,
        "nvmlGpmSampleFree": lambda sample: None,
    }
    for key, value in names.items():
        setattr(m, key, value)
    return m
