"""The vendor protocol's wire shapes (quote, submit, status, cancel), shared by client and mock."""

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


class VendorJob(Model):
    """What `GET /job-status` answers: the whole job as the vendor sees it."""

    job_id: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1)
    logs: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] | None = None
    artifact_url: str | None = None
    error: str | None = None
    checkpoint_url: str | None = None
    amount: Usd | None = None
