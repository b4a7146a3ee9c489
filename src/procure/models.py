"""The domain in pydantic: vendors, runs, jobs, payments, observations, quotes and actions.

Money is held as integer micro-USD (1e-6 USD, the atomic unit of a 6-decimal USDC-style token)
so budget arithmetic is exact; JSON shows it as dollars. Imports nothing of the project.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    computed_field,
)
from pydantic.alias_generators import to_camel

MICROS_PER_USD = 1_000_000


def usd_to_micros(value: float | int | str | Decimal, *, rounding: str = ROUND_HALF_UP) -> int:
    """Dollars (as given by a user or an API) to integer micro-USD, rounded half up unless
    `rounding` (a `decimal` rounding mode) says otherwise."""
    micros = Decimal(str(value)) * MICROS_PER_USD
    return int(micros.quantize(Decimal(1), rounding=rounding))


def budget_to_micros(value: float | int | str | Decimal) -> int:
    """A budget in dollars to micro-USD, rounded down: a budget never grows by rounding
    ($4.9999995 is $4.999999)."""
    return usd_to_micros(value, rounding=ROUND_DOWN)


def micros_to_usd(micros: int) -> float:
    return float(Decimal(micros) / MICROS_PER_USD)


def format_usd(micros: int) -> str:
    return f"${Decimal(micros) / MICROS_PER_USD:,.2f}"


def format_dollars(dollars: float) -> str:
    """An amount given in dollars, rounded as `format_usd` rounds micro-USD."""
    return format_usd(usd_to_micros(dollars))


def _parse_usd(value: Any) -> Any:
    # Internal code passes ints (micros); JSON input in dollars arrives as float/str.
    if isinstance(value, bool):
        raise ValueError("must be a number of dollars")
    if isinstance(value, int):
        return value
    if isinstance(value, float | str | Decimal):
        return usd_to_micros(value)
    return value


_USD_MARK = BeforeValidator(_parse_usd)

Usd = Annotated[
    int,
    _USD_MARK,
    PlainSerializer(micros_to_usd, return_type=float, when_used="json"),
    WithJsonSchema({"type": "number", "description": "US dollars"}),
]
"""Money: an int of micro-USD in Python, a number of dollars in JSON."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        """Validate JSON from outside, where every money field is dollars, even a bare `2`.

        In Python an int `Usd` is micro-USD; on the wire a number is always dollars, so
        integers there are turned into floats before validation.
        """
        if isinstance(data, dict):
            data = dict(data)
            for name, field in cls.model_fields.items():
                if _USD_MARK in field.metadata:
                    for key in (field.alias or name, name):
                        value = data.get(key)
                        if isinstance(value, int) and not isinstance(value, bool):
                            data[key] = float(value)
        return cls.model_validate(data)


class RunStatus(StrEnum):
    running = "running"
    completed = "completed"
    failed = "failed"
    aborted = "aborted"
    cancelled = "cancelled"


TERMINAL_RUN_STATUSES = frozenset(
    {RunStatus.completed, RunStatus.failed, RunStatus.aborted, RunStatus.cancelled}
)


class JobStatus(StrEnum):
    submitted = "submitted"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_JOB_STATUSES = frozenset({JobStatus.submitted, JobStatus.running})


class PaymentStatus(StrEnum):
    pending = "pending"
    completed = "completed"
    failed = "failed"


class ObservationType(StrEnum):
    agent_reasoning = "agent_reasoning"
    job_log = "job_log"
    error = "error"
    payment_event = "payment_event"
    job_event = "job_event"
    llm_response = "llm_response"


CLOUD_PROVIDERS = ("lambda", "runpod", "vast")  # as procure.clouds.base.PROVIDERS
CLOUD_NONCE_PREFIX = "cloud-"  # the nonces of cloud instances' payments (the provider bills)
# A GPU model's name, as a filter or an offer names it.
GPU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"


class CloudTerms(Model):
    """What a cloud-account vendor may rent: one GPU model and count, at most this price per
    hour (the whole instance), interruptible (spot, bid) offers or not, in these regions."""

    provider: Literal["lambda", "runpod", "vast"]
    gpu: str = Field(min_length=1, max_length=32, description="Canonical model, e.g. A100")
    count: int = Field(1, ge=1, le=16)
    max_price_per_hour: Usd = Field(ge=0, le=10**12)
    spot: bool = Field(False, description="Interruptible offers (Vast.ai bids) allowed")
    regions: list[str] = Field(default_factory=list, description="Empty: any region")
    image: str | None = Field(None, max_length=300, description="Container image to run")


class OfferTerms(Model):
    """The offer the agent weighs a cloud vendor at for one decision (never stored on the
    vendor): what it costs and risks, from the provider's offers and what procure learned."""

    provider: str
    offer_id: str
    gpu: str
    gpu_count: int
    region: str
    price_per_hour: Usd
    interruptible: bool
    billing_increment_s: int
    boot_s: float = Field(description="Expected seconds from launch to a running node")
    preemption_hazard: float = Field(0.0, description="Preemptions per hour beyond failures")
    min_bid_per_hour: Usd | None = None


class Vendor(Model):
    vendor_id: str
    name: str
    endpoint: str
    base_price_per_hour: Usd
    reliability_score: float = Field(ge=0, le=1, description="Prior reliability, 0..1")
    supported_gpu_types: list[str]
    pay_to: str | None = Field(None, description="Only payee address the agent will pay")
    network: str | None = Field(None, description="CAIP-2 network the vendor is paid on")
    asset: str | None = Field(None, description="Token contract the vendor is paid in")
    successes: int = 0
    failures: int = 0
    gpu_hours: float = 0.0
    cooldown_until: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    credential: str | None = Field(
        None,
        exclude=True,
        repr=False,
        description="The vendor's own bearer credential, encrypted; never serialised",
    )
    kind: Literal["x402", "cloud"] = Field(
        "x402", description="An x402 vendor, or a cloud account whose instances the agent rents"
    )
    cloud: CloudTerms | None = Field(None, description="What a cloud vendor may rent")
    offer: OfferTerms | None = Field(
        None, exclude=True, description="The offer a planner weighs it at now (not stored)"
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def has_credential(self) -> bool:
        """Whether the vendor has a credential of its own (the value is never shown)."""
        return self.credential is not None


class JobSpec(Model):
    """What the user wants run; carried by the run and sent to the vendor."""

    gpu_type: str = "A100"
    hours: float = Field(1.0, gt=0, le=24 * 30)
    epochs: int = Field(3, ge=1, le=1000)
    model: str = "tiny-llm"
    dataset: str = "dataset-a"
    checkpoint_every: float = Field(
        0.25, gt=0, le=1, description="Progress between checkpoints, as a fraction of the job"
    )


class Run(Model):
    id: str = Field(alias="_id")
    user_id: str
    goal: str
    status: RunStatus
    budget_total: Usd
    budget_remaining: Usd
    job_spec: JobSpec
    progress: float = 0.0
    status_reason: str | None = None
    deadline: datetime | None = Field(None, description="When the job must be done by, if ever")
    cancel_requested_at: datetime | None = Field(
        None, description="When a user asked to cancel the run (it ends `cancelled`)"
    )
    cancel_reason: str | None = Field(None, description="Who asked to cancel, and why")
    troubles: int = Field(0, description="Ticks in a row that found no way forward")
    log_lines: int = Field(0, description="Vendor log lines kept for this run")
    created_at: datetime
    updated_at: datetime


class Job(Model):
    id: str = Field(alias="_id")
    run_id: str
    vendor_id: str
    vendor_job_id: str | None = None
    status: JobStatus
    expected_cost: Usd
    actual_cost: Usd | None = None
    job_params: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str
    quote_id: str | None = None
    error_message: str | None = None
    artifact_url: str | None = None
    metrics: dict[str, Any] | None = None
    progress: float = 0.0
    log_cursor: int = 0
    start_progress: float = Field(0.0, description="Run progress this job resumed from")
    checkpoint_url: str | None = Field(None, description="Latest checkpoint, or the resumed one")
    checkpoint_progress: float = Field(0.0, description="Run progress saved in checkpoint_url")
    slice_hours: float | None = Field(None, description="Hours bought per payment; None: all")
    progressed_at: datetime | None = Field(
        None, description="When the vendor last reported progress"
    )
    started_at: datetime | None = Field(
        None,
        description=(
            "When its start-up ended, read between the last poll that found it queued and the"
            " first that found it running; null where that window was too wide to tell"
        ),
    )
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None


class Payment(Model):
    id: str = Field(alias="_id")
    run_id: str
    job_id: str
    vendor_id: str
    amount: Usd
    currency: str = "USD"
    status: PaymentStatus
    x402_tx_id: str | None = Field(None, alias="x402TxId")
    nonce: str
    pay_to: str | None = None
    hours: float | None = Field(None, description="GPU hours this payment buys")
    error_message: str | None = None
    ask_again_at: datetime | None = Field(
        None, description="when the vendor still settling it may be asked again (Retry-After)"
    )
    created_at: datetime
    updated_at: datetime

    @property
    def reserves_cloud(self) -> bool:
        """A cloud instance's reservation (booked from the provider's bill), not an x402
        authorisation: no facilitator knows its nonce."""
        return self.nonce.startswith(CLOUD_NONCE_PREFIX)


class Observation(Model):
    id: int = Field(alias="_id")
    run_id: str
    type: ObservationType
    content: str
    vendor_id: str | None = None
    timestamp: datetime


class Quote(Model):
    # A vendor's answer: bounded, so nothing it sends can overflow a column or a sum.
    quote_id: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00]*$")
    vendor_id: str = Field(max_length=64)
    gpu_type: str = Field(max_length=64)
    hours: float = Field(gt=0, le=24 * 365, allow_inf_nan=False)
    price_per_hour: Usd = Field(ge=0, le=10**15)
    amount: Usd = Field(ge=0, le=10**15)
    currency: str = Field("USD", max_length=8)
    expires_at: datetime | None = None


class Action(Model):
    action: Literal["start_job", "wait", "abort"]
    vendor_id: str | None = None
    hours: float | None = None
    gpu_type: str | None = None
    slice_hours: float | None = Field(
        None, description="Pay as you go: hours bought per payment (null: all hours at once)"
    )
    reason: str


class RunState(Model):
    """Everything a tick or a planner knows about a run: the status view of the seeds."""

    run: Run
    jobs: list[Job]
    payments: list[Payment]
    observations: list[Observation]
