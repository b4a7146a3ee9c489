"""A simulated NVML: a module with pynvml's names (what `gpu.probe.read_nvml` calls) whose
figures follow the work placed on the instance: a busy GPU runs near 100 %, hot and power-hungry,
an idle one sits at 0 %; a lost GPU raises NVML's own error."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class SimGpu:
    name: str
    uuid: str
    memory_total_mb: int
    power_limit_w: int
    busy: bool = False
    lost: bool = False


class NVMLError(Exception):
    pass


class NVMLError_GpuIsLost(NVMLError):
    def __str__(self) -> str:
        return "GPU is lost"


class NVMLError_NotSupported(NVMLError):
    def __str__(self) -> str:
        return "Not Supported"


def sim_nvml(read: Callable[[], list[SimGpu]]) -> types.ModuleType:
    """A pynvml-shaped module; `read` is called once per `nvmlInit` (one consistent snapshot per
    probe, as a real read of all GPUs happens within milliseconds)."""
    m = types.ModuleType("pynvml")
    snapshot: list[SimGpu] = []

    def init() -> None:
        snapshot[:] = read()

    def handle(index: int) -> SimGpu:
        return snapshot[index]

    def memory(g: SimGpu) -> types.SimpleNamespace:
        if g.lost:
            raise NVMLError_GpuIsLost()
        used = int(g.memory_total_mb * 0.82) if g.busy else 412
        return types.SimpleNamespace(
            total=g.memory_total_mb * MIB, used=used * MIB, free=(g.memory_total_mb - used) * MIB
        )

    def utilisation(g: SimGpu) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=98 if g.busy else 0, memory=61 if g.busy else 0)

    def energy(_g: SimGpu) -> int:
        raise NVMLError_NotSupported()  # no energy counter is simulated

    names: dict[str, object] = {
        "NVMLError": NVMLError,
        "NVMLError_GpuIsLost": NVMLError_GpuIsLost,
        "NVMLError_NotSupported": NVMLError_NotSupported,
        "NVML_TEMPERATURE_GPU": 0,
        "NVML_CLOCK_SM": 1,
        "NVML_CLOCK_MEM": 2,
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "550.127.05",
        "nvmlDeviceGetCount": lambda: len(snapshot),
        "nvmlDeviceGetHandleByIndex": handle,
        "nvmlDeviceGetName": lambda g: g.name,
        "nvmlDeviceGetUUID": lambda g: g.uuid,
        "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetUtilizationRates": utilisation,
        "nvmlDeviceGetTemperature": lambda g, _sensor: 74 if g.busy else 33,
        "nvmlDeviceGetPowerUsage": lambda g: g.power_limit_w * (880 if g.busy else 90),
        "nvmlDeviceGetEnforcedPowerLimit": lambda g: g.power_limit_w * 1000,
        "nvmlDeviceGetClockInfo": lambda g, clock: (
            (1410 if g.busy else 210) if clock == 1 else 1215
        ),
        "nvmlDeviceGetTotalEnergyConsumption": energy,
    }
    for key, value in names.items():
        setattr(m, key, value)
    return m
