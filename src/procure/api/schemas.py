"""Request bodies of the API, validated strictly so bad input gets a 4xx with a clear message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Self

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_validator

from procure.models import JobSpec, Model


class StartRequest(Model):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr = Field(min_length=1, max_length=200)
    goal: StrictStr = Field(min_length=1, max_length=2000)
    budget_total: StrictFloat | StrictInt = Field(gt=0, le=1_000_000, description="US dollars")
    gpu_type: StrictStr = "A100"
    hours: StrictFloat | StrictInt = Field(1.0, gt=0, le=720)
    epochs: StrictInt = Field(3, ge=1, le=1000)
    checkpoint_every: StrictFloat | None = Field(
        None, gt=0, le=1, description="Progress between checkpoints, as a fraction of the job"
    )
    deadline: datetime | None = Field(None, description="ISO time the job must be done by")
    deadline_hours: StrictFloat | StrictInt | None = Field(
        None, gt=0, le=24 * 365, description="Or: hours from now the job must be done in"
    )

    @model_validator(mode="after")
    def _one_deadline(self) -> Self:
        if self.deadline is not None and self.deadline_hours is not None:
            raise ValueError("give deadline or deadlineHours, not both")
        return self

    def job_spec(self) -> JobSpec:
        extra = {} if self.checkpoint_every is None else {"checkpoint_every": self.checkpoint_every}
        return JobSpec(gpu_type=self.gpu_type, hours=float(self.hours), epochs=self.epochs, **extra)

    def deadline_at(self, now: datetime) -> datetime | None:
        """The deadline as an aware UTC time (a time without a zone is taken as UTC)."""
        if self.deadline_hours is not None:
            return now + timedelta(hours=float(self.deadline_hours))
        if self.deadline is None:
            return None
        deadline = self.deadline
        return deadline.replace(tzinfo=UTC) if deadline.tzinfo is None else deadline


class TickRequest(Model):
    run_id: StrictStr = Field(min_length=1)
