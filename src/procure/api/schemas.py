"""Request bodies of the API, validated strictly so bad input gets a 4xx with a clear message."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import (
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from procure.agent.cloud_vendors import MAX_PRICE_PER_HOUR_USD
from procure.agent.start_request import (
    MAX_BUDGET_USD,
    MAX_DEADLINE_HOURS,
    MAX_HOURS,
    MIN_CHECKPOINT_EVERY,
    MIN_HOURS,
    NO_NUL,
    StartRequest,
    Text,
    problems,
)
from procure.clouds.base import PROVIDERS
from procure.models import Model, Vendor, usd_to_micros
from procure.payments.wallet import checksum_address

__all__ = [
    "MAX_BUDGET_USD",
    "MAX_DEADLINE_HOURS",
    "MAX_HOURS",
    "MIN_CHECKPOINT_EVERY",
    "MIN_HOURS",
    "NO_NUL",
    "READ_ONLY_VENDOR_FIELDS",
    "CancelRequest",
    "StartRequest",
    "Text",
    "TickRequest",
    "VendorRegistration",
    "problems",
]


class TickRequest(Model):
    run_id: Text = Field(min_length=1, max_length=200)


MAX_VENDOR_COUNT = 1_000_000_000
_VENDOR_ID = r"^[A-Za-z0-9_.-]+$"
_CREDENTIAL = r"^[\x21-\x7e]+$"  # visible ASCII: a valid bearer header value, nothing else
_HEX40 = re.compile(r"[0-9a-fA-F]{40}")
_GpuType = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=NO_NUL)]


_READ_ONLY: dict[str, Any] = {"readOnly": True}
READ_ONLY_VENDOR_FIELDS = frozenset(
    {
        "created_at",
        "updated_at",
        "cooldown_until",
        "has_credential",
        "learned_reliability",
        "hazard_per_hour",
        "kind",
        "cloud",
    }
)
"""Fields of a vendor that its answers carry and a write ignores."""


# A cloud vendor's endpoint (`POST /api/vendors/cloud` writes it): read back and written again.
CLOUD_ENDPOINTS = frozenset(f"cloud:{p}" for p in PROVIDERS)


class VendorRegistration(Model):
    """`PUT /api/vendors/{vendorId}`: a vendor's registry entry, checked field by field.

    `credential` is write-only: stored encrypted, sent as the bearer token to this vendor
    alone, never shown (answers say `hasCredential`). Given again it replaces the stored one;
    left out, the stored one is kept while the endpoint stays the same and dropped when the
    endpoint changes (a credential belongs to the endpoint it was given for); `null` drops it.
    """

    model_config = ConfigDict(extra="forbid")

    vendor_id: StrictStr = Field(min_length=1, max_length=64, pattern=_VENDOR_ID)
    # NO_NUL: PostgreSQL cannot keep a NUL where SQLite would, so both stores refuse it alike
    name: StrictStr = Field(min_length=1, max_length=200, pattern=NO_NUL)
    endpoint: StrictStr = Field(
        min_length=1, max_length=500, description="http(s) URL of the vendor's API"
    )
    base_price_per_hour: StrictFloat = Field(
        ge=0, le=MAX_PRICE_PER_HOUR_USD, allow_inf_nan=False, description="US dollars per hour"
    )
    reliability_score: StrictFloat = Field(
        ge=0, le=1, allow_inf_nan=False, description="Prior reliability, 0..1"
    )
    supported_gpu_types: list[_GpuType] = Field(max_length=32)
    pay_to: StrictStr | None = Field(
        None, max_length=42, description="Only payee address the agent will pay (0x + 40 hex)"
    )
    network: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=NO_NUL,
        description="CAIP-2 network the vendor is paid on",
    )
    asset: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=NO_NUL,
        description="Token contract the vendor is paid in",
    )
    successes: StrictInt = Field(0, ge=0, le=MAX_VENDOR_COUNT)
    failures: StrictInt = Field(0, ge=0, le=MAX_VENDOR_COUNT)
    gpu_hours: StrictFloat = Field(0.0, ge=0, le=MAX_VENDOR_COUNT, allow_inf_nan=False)
    credential: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=4096,
        pattern=_CREDENTIAL,
        description="Write-only bearer credential for this vendor alone (visible ASCII)",
        json_schema_extra={"writeOnly": True},
    )
    # What `GET /api/vendors` answers beside the registry entry: accepted so that a vendor
    # read can be written back as it is, and ignored (procure keeps or computes them)
    created_at: datetime | None = Field(None, json_schema_extra=_READ_ONLY)
    updated_at: datetime | None = Field(None, json_schema_extra=_READ_ONLY)
    cooldown_until: datetime | None = Field(
        None,
        json_schema_extra=_READ_ONLY,
        description="Read-only; `DELETE /api/vendors/{vendorId}/cooldown` clears it",
    )
    has_credential: bool | None = Field(None, json_schema_extra=_READ_ONLY)
    learned_reliability: float | None = Field(None, json_schema_extra=_READ_ONLY)
    hazard_per_hour: float | None = Field(None, json_schema_extra=_READ_ONLY)
    kind: Literal["x402", "cloud"] | None = Field(None, json_schema_extra=_READ_ONLY)
    cloud: dict[str, Any] | None = Field(None, json_schema_extra=_READ_ONLY)

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        example = "e.g. https://vendor.example:4001"
        if value in CLOUD_ENDPOINTS:  # a cloud vendor's, as stored: kept only for one (vendors)
            return value
        if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(f"must be an http(s) URL without spaces, {example}")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises on a port that is not a number in range
            httpx.URL(value)
        except (ValueError, httpx.InvalidURL):
            raise ValueError(
                f"must be an http(s) URL with a valid host and port, {example}"
            ) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s) URL with a host, {example}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry a user or password: give `credential` instead")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or a fragment")
        return value.rstrip("/")

    @field_validator("pay_to")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        hex_part = value[2:]
        if not (value.startswith("0x") and _HEX40.fullmatch(hex_part)):
            raise ValueError("must be an EVM address: 0x and 40 hex digits")
        canonical = checksum_address(bytes.fromhex(hex_part))
        mixed_case = hex_part not in (hex_part.lower(), hex_part.upper())
        if mixed_case and value != canonical:
            raise ValueError("has mixed case but a wrong EIP-55 checksum (a typo?)")
        return canonical

    def to_vendor(self, credential: str | None) -> Vendor:
        """The domain vendor, with `credential` already encrypted (or None)."""
        return Vendor(
            vendor_id=self.vendor_id,
            name=self.name,
            endpoint=self.endpoint,
            base_price_per_hour=usd_to_micros(self.base_price_per_hour),
            reliability_score=self.reliability_score,
            supported_gpu_types=list(self.supported_gpu_types),
            pay_to=self.pay_to,
            network=self.network,
            asset=self.asset,
            successes=self.successes,
            failures=self.failures,
            gpu_hours=self.gpu_hours,
            credential=credential,
        )


class CancelRequest(Model):
    """`POST /api/runs/{id}/cancel`: who asks and why (both optional, kept in the run)."""

    model_config = ConfigDict(extra="forbid")

    requested_by: StrictStr | None = Field(None, min_length=1, max_length=200)
    reason: StrictStr | None = Field(None, min_length=1, max_length=500)
