"""Request bodies of the API, validated strictly so bad input gets a 4xx with a clear message."""

from __future__ import annotations

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from procure.models import JobSpec, Model


class StartRequest(Model):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr = Field(min_length=1, max_length=200)
    goal: StrictStr = Field(min_length=1, max_length=2000)
    budget_total: StrictFloat | StrictInt = Field(gt=0, le=1_000_000, description="US dollars")
    gpu_type: StrictStr = "A100"
    hours: StrictFloat | StrictInt = Field(1.0, gt=0, le=720)
    epochs: StrictInt = Field(3, ge=1, le=1000)

    def job_spec(self) -> JobSpec:
        return JobSpec(gpu_type=self.gpu_type, hours=float(self.hours), epochs=self.epochs)


class TickRequest(Model):
    run_id: StrictStr = Field(min_length=1)
