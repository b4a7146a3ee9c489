"""What a mock vendor is (`MockVendorConfig`) and the faults it can inject (`Faults`), changed
at run time with `POST /admin/faults`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FOREIGN_PAYEE = "0x000000000000000000000000000000000000dEaD"
FOREIGN_ASSET = "0x00000000000000000000000000000000DeaDBeef"
FOREIGN_NETWORK = "eip155:8453"  # Base mainnet: real money, never ours to pay on


class Faults(BaseModel):
    """Faults to inject; each applies to the endpoints named in `endpoints` (all if empty)."""

    # `POST /admin/faults` takes them from outside: an infinite hang or factor is refused.
    model_config = ConfigDict(allow_inf_nan=False)

    error500: bool = False
    garbage: bool = False
    hang_seconds: float = 0.0
    refuse_capacity: bool = False
    overcharge_factor: float = Field(1.0, ge=0)
    reprice_factor: float = Field(1.0, gt=0, le=1000)  # quotes from now on at this times the price
    foreign_payee: bool = False
    foreign_asset: bool = False
    foreign_network: bool = False
    lowercase_addresses: bool = False  # payee and asset not EIP-55 checksummed, as some send
    answer_delay_s: float = Field(0.0, ge=0)  # submit-job: settle, then answer this late
    # A hostile vendor's answers (the agent must record an error and move on, never crash):
    deep_json: bool = False  # 100,000 nested `[` instead of an answer
    drip_bytes_per_s: float = Field(0.0, ge=0)  # the answer one byte at a time, this fast
    wrong_types: bool = False  # JSON whose fields have the wrong types
    huge_line_bytes: int = Field(0, ge=0, le=64 << 20)  # job-status: one log line this long
    extra_log_lines: int = Field(0, ge=0, le=1_000_000)  # job-status: this many more lines
    nul_in_logs: bool = False  # job-status: a log line and the error with NUL characters
    huge_error_bytes: int = Field(0, ge=0, le=64 << 20)  # a failed job's error this long
    # From 30% on; "regress": back to 5% once job-status has shown 10% or more.
    progress_lie: Literal["", "regress", "early_complete", "stuck"] = ""
    endpoints: list[str] = Field(default_factory=list)


@dataclass
class MockVendorConfig:
    vendor_id: str
    name: str
    price_per_hour: int  # micro-USD
    secret: str
    pay_to: str
    network: str
    asset: str
    asset_extra: dict[str, Any]
    gpu_types: list[str] = field(default_factory=lambda: ["A10", "A100", "H100"])
    job_seconds: float = 6.0
    fail_rate: float = 0.0
    fail_at: float = 0.47
    checkpoint_every: float = 0.25
    faults: Faults = field(default_factory=Faults)
    grace_seconds: float | None = None  # a job out of paid time waits this long for a renewal
    x402_versions: tuple[int, ...] = (1, 2)  # the x402 versions its 402s offer and it accepts
    min_hours: float = 0.0  # it sells at least this many hours: a quote for less is rounded up
