"""The vendor protocol's wire shapes (quote, submit, renew, status, cancel), shared by client and
mock. A job may be paid in slices: `POST /renew-job` buys more hours of a running job (paid over
x402 like submit-job, one idempotency key per slice), and a job whose paid time runs out stops
with status `expired`, its last checkpoint intact.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from procure.models import Model, Usd

IDEMPOTENCY_HEADER = "Idempotency-Key"
QUOTE_HEADER = "X-Quote-Id"


class QuoteRequest(Model):
    gpu_type: str
    hours: float = Field(gt=0)


class SubmitRequest(Model):
    quote_id: str
    job_params: dict[str, Any] = Field(default_factory=dict)
    checkpoint_url: str | None = None


class RenewRequest(Model):
    job_id: str
    quote_id: str


class VendorJob(Model):
    """What `GET /job-status` answers: the whole job as the vendor sees it."""

    job_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled", "expired"]
    progress: float = Field(ge=0, le=1)
    logs: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] | None = None
    artifact_url: str | None = None
    error: str | None = None
    checkpoint_url: str | None = None
    checkpoint_progress: float | None = Field(None, ge=0, le=1)
    paid_hours: float | None = None
    amount: Usd | None = None
