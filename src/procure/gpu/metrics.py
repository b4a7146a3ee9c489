"""`/metrics` as dcgm-exporter writes it: its default counters' names, types, help and units, and
its labels (`gpu`, `UUID`, `pci_bus_id`, `device`, `modelName`, `Hostname`,
`DCGM_FI_DRIVER_VERSION`), so NVIDIA's dashboards and gpu-operator's rules work unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable

from procure.gpu.probe import Gpu, Probe

LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
Figure = Callable[[Gpu], float | None]


def _xid(gpu: Gpu) -> int | None:
    # dcgm's meaning: the last XID, 0 while none was seen; absent where XIDs are not watched.
    if gpu.xid_errors is None:
        return None
    return gpu.last_xid or 0


# dcgm-exporter's etc/default-counters.csv, in its order (plus DCGM_FI_DEV_FB_TOTAL): name,
# Prometheus type, help, the Gpu figure. Counters keep dcgm's names (no `_total` suffix), as
# every dashboard and rule written for dcgm-exporter queries them by those names.
FIELDS: list[tuple[str, str, str, Figure]] = [
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", lambda g: g.sm_clock_mhz),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "gauge",
        "Memory clock frequency (in MHz).",
        lambda g: g.mem_clock_mhz,
    ),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", lambda g: g.memory_temp_c),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", lambda g: g.temperature_c),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", lambda g: g.power_w),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        lambda g: g.energy_mj,
    ),
    (
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "counter",
        "Total number of PCIe retries.",
        lambda g: g.pcie_replays,
    ),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", lambda g: g.utilization_gpu_pct),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "gauge",
        "Memory utilization (in %).",
        lambda g: g.utilization_memory_pct,
    ),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge", "Encoder utilization (in %).", lambda g: g.enc_util_pct),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge", "Decoder utilization (in %).", lambda g: g.dec_util_pct),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", _xid),
    (
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        lambda g: g.memory_free_mb,
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        lambda g: g.memory_used_mb,
    ),
    (
        "DCGM_FI_DEV_FB_RESERVED",
        "gauge",
        "Framebuffer memory reserved (in MiB).",
        lambda g: g.memory_reserved_mb,
    ),
    (
        "DCGM_FI_DEV_FB_TOTAL",
        "gauge",
        "Framebuffer memory total (in MiB).",
        lambda g: g.memory_total_mb,
    ),
    (
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "counter",
        "Total number of NVLink bandwidth counters for all lanes.",
        lambda g: g.nvlink_bandwidth_total,
    ),
    (
        "DCGM_FI_DEV_VGPU_LICENSE_STATUS",
        "gauge",
        "vGPU License status",
        lambda g: g.vgpu_license_status,
    ),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for uncorrectable errors",
        lambda g: g.remapped_rows_uncorrectable,
    ),
    (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        "Number of remapped rows for correctable errors",
        lambda g: g.remapped_rows_correctable,
    ),
    (
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "gauge",
        "Whether remapping of rows has failed",
        lambda g: g.row_remap_failure,
    ),
    (
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "gauge",
        "Ratio of time the graphics engine is active.",
        lambda g: g.gr_engine_active,
    ),
    (
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        lambda g: g.tensor_active,
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        lambda g: g.dram_active,
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
        lambda g: g.pcie_tx_bytes_s,
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and "
        "data payloads - in bytes per second.",
        lambda g: g.pcie_rx_bytes_s,
    ),
]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    return repr(float(value))


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}"


def _family(name: str, kind: str, doc: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples]


def exposition(probe: Probe, hostname: str) -> bytes:
    """The Prometheus text for one probe. A figure a GPU cannot give has no sample (never 0);
    the family's HELP and TYPE are always there."""
    gpus = [g for g in probe.gpus if g.uuid is not None]
    lines: list[str] = []
    for name, kind, doc, figure in FIELDS:
        samples = []
        for gpu in gpus:
            value = figure(gpu)
            if value is not None and math.isfinite(value):
                samples.append(_sample(name, _labels(gpu, hostname, probe), value))
        lines += _family(name, kind, doc, samples)
    # Ours, not dcgm-exporter's: how many GPUs NVML sees and which of them it cannot read.
    lines += _family(
        "procure_gpus",
        "gauge",
        "GPUs NVML reports (0: no driver).",
        [_sample("procure_gpus", {"Hostname": hostname}, probe.gpu_count)],
    )
    lines += _family(
        "procure_gpu_read_error",
        "gauge",
        "1 when NVML failed to read this GPU.",
        [
            _sample(
                "procure_gpu_read_error",
                {"gpu": str(g.index), "Hostname": hostname},
                1 if g.error else 0,
            )
            for g in probe.gpus
        ],
    )
    return ("\n".join(lines) + "\n").encode()


def _labels(gpu: Gpu, hostname: str, probe: Probe) -> dict[str, str]:
    values = (
        str(gpu.index),
        gpu.uuid or "",
        gpu.pci_bus_id or "",
        f"nvidia{gpu.index}",
        gpu.name or "",
        hostname,
        probe.driver_version or "",
    )
    return dict(zip(LABELS, values, strict=True))
