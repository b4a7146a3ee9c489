"""Request bodies of the API, validated strictly so bad input gets a 4xx with a clear message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

import httpx
from eth_utils import is_address, is_checksum_address, to_checksum_address
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from procure.models import JobSpec, Model, Vendor, budget_to_micros, usd_to_micros, utcnow

MAX_BUDGET_USD = 1_000_000
MIN_HOURS = 1 / 60
"""One minute of GPU work: less cannot be quoted at a micro-dollar or checkpointed usefully."""
MAX_HOURS = 720
MIN_CHECKPOINT_EVERY = 0.01
"""At most 100 checkpoints per job."""
MAX_DEADLINE_HOURS = 24 * 365 * 5
"""A deadline lies at most five years ahead."""
NO_NUL = r"^[^\x00]*$"
"""Text without NUL characters: PostgreSQL cannot store them (nor look them up)."""


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[StrictStr, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL})]
"""A string from outside that the store can keep: validated with a clear message, and stated as
a JSON Schema `pattern` in /openapi.json."""

# StrictFloat accepts JSON integers (but not booleans or strings); as a plain `number` the
# bounds below appear in /openapi.json as standard JSON Schema (`minimum`, `maximum`,
# `exclusiveMinimum`), which a StrictFloat | StrictInt union would hide in pydantic's own
# `gt`/`le` keys.


class StartRequest(Model):
    model_config = ConfigDict(extra="forbid")

    user_id: Text = Field(min_length=1, max_length=200)
    goal: Text = Field(min_length=1, max_length=2000)
    budget_total: StrictFloat = Field(
        ge=0.000001,
        le=MAX_BUDGET_USD,
        allow_inf_nan=False,
        description="US dollars, at least one micro-dollar (rounded down to whole micro-dollars)",
    )
    gpu_type: Text = Field("A100", min_length=1, max_length=64)
    hours: StrictFloat = Field(
        1.0,
        ge=MIN_HOURS,
        le=MAX_HOURS,
        allow_inf_nan=False,
        description="GPU hours of work (at least one minute)",
    )
    epochs: StrictInt = Field(3, ge=1, le=1000)
    checkpoint_every: StrictFloat | None = Field(
        None,
        ge=MIN_CHECKPOINT_EVERY,
        le=1,
        allow_inf_nan=False,
        description="Progress between checkpoints, as a fraction of the job",
    )
    deadline: datetime | None = Field(
        None, description="ISO time the job must be done by: in the future, within five years"
    )
    deadline_hours: StrictFloat | None = Field(
        None,
        gt=0,
        le=MAX_DEADLINE_HOURS,
        allow_inf_nan=False,
        description="Or: hours from now the job must be done in",
    )

    @field_validator("hours", mode="before")
    @classmethod
    def _at_least_a_minute(cls, value: Any) -> Any:
        # Said in minutes: pydantic's own message would print the bound as 0.016666666666666666.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if is_number and value < MIN_HOURS:
            raise PydanticCustomError(
                "greater_than_equal",
                "Input should be at least 1 minute (0.0167 hours)",
                {"ge": MIN_HOURS},
            )
        return value

    @field_validator("budget_total")
    @classmethod
    def _whole_micros(cls, value: float) -> float:
        if budget_to_micros(value) < 1:
            raise ValueError("must be at least one micro-dollar (0.000001)")
        return value

    @field_validator("deadline")
    @classmethod
    def _sane_deadline(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
            now = utcnow()
            ahead = value - now
        except (OverflowError, ValueError):
            raise ValueError("is not a representable time") from None
        if ahead <= timedelta(0):
            raise ValueError("must be in the future")
        if ahead > timedelta(hours=MAX_DEADLINE_HOURS):
            raise ValueError("must be at most five years ahead")
        return value

    @model_validator(mode="after")
    def _one_deadline(self) -> Self:
        if self.deadline is not None and self.deadline_hours is not None:
            raise ValueError("give deadline or deadlineHours, not both")
        return self

    def budget_micros(self) -> int:
        """The budget in micro-USD, rounded down (never up)."""
        return budget_to_micros(self.budget_total)

    def job_spec(self) -> JobSpec:
        extra = {} if self.checkpoint_every is None else {"checkpoint_every": self.checkpoint_every}
        return JobSpec(gpu_type=self.gpu_type, hours=float(self.hours), epochs=self.epochs, **extra)

    def deadline_at(self, now: datetime) -> datetime | None:
        """The deadline as an aware UTC time (a time without a zone is taken as UTC)."""
        if self.deadline_hours is not None:
            return now + timedelta(hours=float(self.deadline_hours))
        return self.deadline


class TickRequest(Model):
    run_id: Text = Field(min_length=1, max_length=200)


def problems(errors: list[Any]) -> list[str]:
    """Pydantic's errors as `field: message` lines (the `body` prefix left out)."""
    return [
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
    ]


MAX_PRICE_PER_HOUR_USD = 10_000
MAX_VENDOR_COUNT = 1_000_000_000
_VENDOR_ID = r"^[A-Za-z0-9_.-]+$"
_CREDENTIAL = r"^[\x21-\x7e]+$"  # visible ASCII: a valid bearer header value, nothing else
_GpuType = Annotated[StrictStr, Field(min_length=1, max_length=64)]


class VendorRegistration(Model):
    """`PUT /api/vendors/{vendorId}`: a vendor's registry entry, checked field by field.

    `credential` is write-only: stored encrypted, sent as the bearer token to this vendor
    alone, never shown (answers say `hasCredential`). Given again it replaces the stored one;
    left out, the stored one is kept while the endpoint stays the same and dropped when the
    endpoint changes (a credential belongs to the endpoint it was given for); `null` drops it.
    """

    model_config = ConfigDict(extra="forbid")

    vendor_id: StrictStr = Field(min_length=1, max_length=64, pattern=_VENDOR_ID)
    name: StrictStr = Field(min_length=1, max_length=200)
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
        None, min_length=1, max_length=64, description="CAIP-2 network the vendor is paid on"
    )
    asset: StrictStr | None = Field(
        None, min_length=1, max_length=64, description="Token contract the vendor is paid in"
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

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        example = "e.g. https://vendor.example:4001"
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
        if not (value.startswith("0x") and len(hex_part) == 40 and is_address(value)):
            raise ValueError("must be an EVM address: 0x and 40 hex digits")
        mixed_case = hex_part not in (hex_part.lower(), hex_part.upper())
        if mixed_case and not is_checksum_address(value):
            raise ValueError("has mixed case but a wrong EIP-55 checksum (a typo?)")
        return str(to_checksum_address(value))

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
