"""What starts a run, validated strictly: the body of `POST /api/agent-start`, the dashboard's
form and `procure run start` all pass through `StartRequest`, so bad input reads the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Self

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

from procure.agent import slices
from procure.clouds.lambda_cloud.wire import BILLING_INCREMENT_S as LAMBDA_INCREMENT_S
from procure.clouds.runpod.wire import BILLING_INCREMENT_S as RUNPOD_INCREMENT_S
from procure.clouds.vast.wire import BILLING_INCREMENT_S as VAST_INCREMENT_S
from procure.models import (
    JobSpec,
    Model,
    Vendor,
    budget_to_micros,
    format_usd,
    micros_to_usd,
    utcnow,
)

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


def problems(errors: list[Any]) -> list[str]:
    """Pydantic's errors as `field: message` lines (the `body` prefix left out)."""
    return [
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
    ]


CLOUD_INCREMENT_S = {
    "lambda": LAMBDA_INCREMENT_S,
    "runpod": RUNPOD_INCREMENT_S,
    "vast": VAST_INCREMENT_S,
}
"""Each cloud's billing increment: a cloud run reserves at least one as its instance launches."""

NO_REFUND = "A cancel stops the job but does not refund a paid slice."


def _increment_hours(vendor: Vendor) -> float:
    """The billing increment of a cloud vendor's provider, in hours (0 for an x402 vendor)."""
    if vendor.cloud is None:
        return 0.0
    return CLOUD_INCREMENT_S.get(vendor.cloud.provider, 1) / 3600


def _gpu_hours(hours: float) -> str:
    return f"{hours:g} GPU-hour{'' if hours == 1 else 's'}"


def first_payment(
    spec: JobSpec, budget: int, vendors: list[Vendor], fraction: float
) -> dict[str, Any]:
    """What a run's first payment may be, said before it starts (the start answer's
    `firstPayment`, the dashboard's form): it is made as the job starts, before any work, and
    a cancel does not refund it. A vendor that has not yet completed a job for procure is
    first paid for `fraction` of a normal first payment (`slices.first_slice`); a proven one
    may be paid for the whole job at once. A cloud instance is billed by its provider's
    increment: at least one is reserved as it launches. Figures are at the listed prices: the
    live quote may differ, bounded by the run's budget."""
    worst: tuple[int, float, str] | None = None
    for v in vendors:
        cloud_gpu = v.cloud is not None and v.cloud.gpu == spec.gpu_type
        if spec.gpu_type not in v.supported_gpu_types and not cloud_gpu:
            continue
        # A cloud gets no short first slice: it rents for the rest of the run, billed by its
        # increment (at least one whatever the run's length).
        short = v.kind == "x402" and v.successes == 0
        probe = slices.first_slice(spec.hours, None, fraction) if short else None
        hours = max(probe or spec.hours, _increment_hours(v))
        amount = min(round(v.base_price_per_hour * hours), budget)
        worst = max(worst or (amount, hours, v.vendor_id), (amount, hours, v.vendor_id))
    if worst is None:
        return {
            "atMost": None,
            "hours": None,
            "vendorId": None,
            "refundable": False,
            "note": f"No registered vendor offers {spec.gpu_type} yet. {NO_REFUND}",
        }
    amount, hours, vendor_id = worst
    short = (
        f"A vendor that has not yet completed a job for procure is first paid for "
        f"{fraction:.0%} of its normal first payment, then in full slices once it runs."
        if fraction < 1
        else ""
    )
    return {
        "atMost": micros_to_usd(amount),
        "hours": round(hours, 6),
        "vendorId": vendor_id,
        "refundable": False,
        "note": (
            f"For {_gpu_hours(spec.hours)} of {spec.gpu_type}, the first payment is made as the "
            f"job starts, before any work: at most about {format_usd(amount)} "
            f"({_gpu_hours(hours)} at {vendor_id}, the dearest first payment among the vendors "
            "it may choose, at its listed price; the live quote may "
            "differ, and no payment may take more than the run's budget). "
            f"{short}{' ' if short else ''}{NO_REFUND}"
        ),
    }
