"""The mock cloud's catalogue: Lambda's instance types (prices as Lambda lists them, in cents per
hour), its regions, and the GPU each type carries as NVML names it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MockType:
    name: str
    description: str
    gpu_description: str
    price_cents_per_hour: int
    vcpus: int
    memory_gib: int
    storage_gib: int
    gpus: int
    nvml_name: str  # what NVML calls the board
    gpu_memory_mb: int
    power_limit_w: int

    def to_json(self, price_cents: int | None = None) -> dict[str, Any]:
        """Lambda's `InstanceType` object (at `price_cents` per hour where the price moved)."""
        price = self.price_cents_per_hour if price_cents is None else price_cents
        return {
            "name": self.name,
            "description": self.description,
            "gpu_description": self.gpu_description,
            "price_cents_per_hour": price,
            "specs": {
                "vcpus": self.vcpus,
                "memory_gib": self.memory_gib,
                "storage_gib": self.storage_gib,
                "gpus": self.gpus,
            },
        }


TYPES: dict[str, MockType] = {
    t.name: t
    for t in [
        MockType(
            "gpu_1x_a10",
            "1x A10 (24 GB PCIe)",
            "A10 (24 GB PCIe)",
            75,
            30,
            200,
            1400,
            1,
            "NVIDIA A10",
            23028,
            150,
        ),
        MockType(
            "gpu_1x_a100",
            "1x A100 (40 GB PCIe)",
            "A100 (40 GB PCIe)",
            129,
            30,
            200,
            512,
            1,
            "NVIDIA A100-PCIE-40GB",
            40960,
            250,
        ),
        MockType(
            "gpu_1x_h100_pcie",
            "1x H100 (80 GB PCIe)",
            "H100 (80 GB PCIe)",
            249,
            26,
            200,
            1024,
            1,
            "NVIDIA H100 PCIe",
            81559,
            350,
        ),
        MockType(
            "gpu_8x_a100",
            "8x A100 (40 GB SXM4)",
            "A100 (40 GB SXM4)",
            1032,
            124,
            1800,
            6144,
            8,
            "NVIDIA A100-SXM4-40GB",
            40960,
            400,
        ),
        MockType(
            "gpu_8x_h100_sxm5",
            "8x H100 (80 GB SXM5)",
            "H100 (80 GB SXM5)",
            2392,
            208,
            1800,
            24780,
            8,
            "NVIDIA H100 80GB HBM3",
            81559,
            700,
        ),
    ]
}

REGIONS: dict[str, str] = {
    "us-west-1": "California, USA",
    "us-east-1": "Virginia, USA",
    "us-south-1": "Texas, USA",
}


def default_capacity(per_region: int = 8) -> dict[str, dict[str, int]]:
    """How many instances of each type each region can hold at once."""
    return {t: dict.fromkeys(REGIONS, per_region) for t in TYPES}


def region_json(name: str) -> dict[str, str]:
    return {"name": name, "description": REGIONS.get(name, name)}
