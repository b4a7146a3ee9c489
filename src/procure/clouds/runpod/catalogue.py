"""The mock RunPod's catalogue: GPU types with RunPod's ids and per-GPU list prices (secure and
community tiers), its data centres, default stock, and what NVML calls each board."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuKind:
    id: str  # RunPod's GPU type id (what createPod's gpu.id takes)
    name: str
    memory_gb: int
    secure_usd: float  # per GPU per hour
    community_usd: float
    max_count: int
    power_limit_w: int
    pool: str

    def price(self, cloud: str) -> float:
        return self.secure_usd if cloud == "SECURE" else self.community_usd

    def most(self, cloud: str) -> int:
        """RunPod's `maxCount` in that tier: the GPUs of its largest machine of this type (the
        community's machines are smaller)."""
        return self.max_count if cloud == "SECURE" else max(1, self.max_count // 2)


GPUS: dict[str, GpuKind] = {
    g.id: g
    for g in [
        GpuKind("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0.34, 8, 450, "ADA_24"),
        GpuKind("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, 1.19, 8, 300, "AMPERE_80"),
        GpuKind("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 2.39, 8, 700, "HOPPER_141"),
        GpuKind("NVIDIA A40", "A40", 48, 0.40, 0.35, 8, 300, "AMPERE_48"),
    ]
}

DATA_CENTERS: dict[str, str] = {
    "US-TX-3": "US Texas 3",
    "EU-RO-1": "EU Romania 1",
    "CA-MTL-1": "CA Montreal 1",
}
CUDA = "12.8"


def default_capacity() -> dict[str, dict[str, int]]:
    """Free GPUs per GPU type per data centre (shared by both tiers)."""
    return {
        "NVIDIA GeForce RTX 4090": {"US-TX-3": 16, "EU-RO-1": 8, "CA-MTL-1": 4},
        "NVIDIA A100 80GB PCIe": {"US-TX-3": 8, "EU-RO-1": 4},
        "NVIDIA H100 80GB HBM3": {"US-TX-3": 8, "CA-MTL-1": 2},
        "NVIDIA A40": {"EU-RO-1": 8, "CA-MTL-1": 8},
    }


def level(free_pods: int) -> str:
    """RunPod's availability level for a number of pods that could be placed now."""
    if free_pods <= 0:
        return "NONE"
    return "LOW" if free_pods < 3 else "MEDIUM" if free_pods < 8 else "HIGH"


def gpu_type_json(kind: GpuKind, prices: dict[str, float]) -> dict[str, Any]:
    """RunPod's `GpuType` without the availability fields."""
    return {
        "id": kind.id,
        "name": kind.name,
        "pool": kind.pool,
        "manufacturer": "NVIDIA",
        "memory": kind.memory_gb,
        "secure": True,
        "community": True,
        "price": {"secure": prices["SECURE"], "community": prices["COMMUNITY"]},
        "maxCount": {"secure": kind.most("SECURE"), "community": kind.most("COMMUNITY")},
    }
