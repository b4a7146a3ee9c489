"""The vendor protocol's wire shapes (quote, submit, renew, status, cancel), shared by client and
mock. A job may be paid in slices: `POST /renew-job` buys more hours of a running job (paid over
x402 like submit-job, one idempotency key per slice), and a job whose paid time runs out stops
with status `expired`, its last checkpoint intact.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from procure.models import Model, Usd
from procure.safetext import outside

METRICS_BYTES = 16 << 10
# A job's log cursor is a 32-bit column: an offset past it (less a page of lines) is refused.
MAX_LOGS_OFFSET = 2**31 - 1 - 10**6
"""A job's metrics as the vendor reports them, at most (they are stored with the job)."""


def _bounded_metrics(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None:
        text = json.dumps(value, default=str)
        if len(text) > METRICS_BYTES:
            raise ValueError(f"metrics larger than {METRICS_BYTES:,} bytes")
        if "\\u0000" in text:
            raise ValueError("metrics hold a NUL character")
    return value


def _clipped(value: Any) -> Any:
    # A vendor's error text is stored with the job and shown: no credential it echoes.
    return outside(value, 2_000) if isinstance(value, str) else value


ErrorText = Annotated[str | None, BeforeValidator(_clipped)]


def _finite_json(value: dict[str, Any]) -> dict[str, Any]:
    """Free-form JSON from outside, refused if it holds NaN, Infinity or a number past a
    float's range (Python's JSON reads 1e999 as infinity): not JSON, no store's JSON column
    takes them, and an answer echoing them fails. A walk with its own stack (the request's
    depth is bounded before), linear in the items."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("a number no float can be (NaN, Infinity or past its range)")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


FiniteJson = Annotated[dict[str, Any], AfterValidator(_finite_json)]
NO_NUL = r"^[^\x00]*$"  # PostgreSQL cannot store a NUL character in text
Url = Annotated[str | None, Field(max_length=500, pattern=NO_NUL)]

IDEMPOTENCY_HEADER = "Idempotency-Key"
QUOTE_HEADER = "X-Quote-Id"


class QuoteRequest(Model):
    gpu_type: str
    hours: float = Field(gt=0, allow_inf_nan=False)


class SubmitRequest(Model):
    quote_id: str
    job_params: FiniteJson = Field(default_factory=dict)
    checkpoint_url: str | None = None


class RenewRequest(Model):
    job_id: str
    quote_id: str


class VendorJob(Model):
    """What `GET /job-status` answers: the whole job as the vendor sees it."""

    job_id: str = Field(min_length=1, max_length=100, pattern=NO_NUL)
    status: Literal["queued", "running", "completed", "failed", "cancelled", "expired"]
    progress: float = Field(ge=0, le=1)
    logs: list[str] = Field(default_factory=list)
    # Where `logs` starts among all the job's lines, for a vendor that shows only the last ones
    # (procure's gateway); absent: `logs` holds them all.
    logs_offset: int | None = Field(None, ge=0, le=MAX_LOGS_OFFSET)
    metrics: Annotated[dict[str, Any] | None, AfterValidator(_bounded_metrics)] = None
    artifact_url: Url = None
    error: ErrorText = None
    checkpoint_url: Url = None
    checkpoint_progress: float | None = Field(None, ge=0, le=1)
    paid_hours: float | None = Field(None, ge=0, allow_inf_nan=False)
    # When the job's paid time ends, for a vendor that ends jobs by the clock rather than by
    # progress (procure's gateway): a buyer renews before it.
    paid_until: datetime | None = None
    amount: Usd | None = None
