"""The fleet controller's configuration, with seed 004's names and defaults."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from procure.gpu.settings import MAX_LEASE_S
from procure.safetext import remember_secret
from procure.settings import CHECKED, blank_is_unset, finite_numbers, http_url, secret_values

WEEK_MINS = 7 * 24 * 60
DAY_S = 24 * 3600
SCAN_LEASES = 5.0  # a scan may run this many fleet leases (FLEET_SCAN_TIMEOUT_S unset)
# Scans' intervals a node's dead-man lease should outlast: one late scan must not lapse it.
NODE_LEASE_SCANS = 2.0
MAX_USD_PER_HOUR = 1e7  # far above any real fleet; a typo of more is refused, not obeyed


class FleetSettings(BaseSettings):
    # A refused value is never echoed: the Slack URL and the node token are secrets.
    model_config = SettingsConfigDict(**CHECKED, populate_by_name=True, hide_input_in_errors=True)

    max_hourly_spend: float = Field(
        100.0, ge=0, le=MAX_USD_PER_HOUR, validation_alias="LAMBDA_LABS_MAX_HOURLY_SPEND"
    )
    max_instances: int = Field(10, ge=0, le=10_000, validation_alias="LAMBDA_LABS_MAX_INSTANCES")
    warning_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        validation_alias="PROCURE_WARNING_THRESHOLD",
        description="Share of each cap (instances, hourly spend) that warns once first",
    )
    min_instances: int = Field(0, ge=0, le=10_000, validation_alias="LAMBDA_LABS_MIN_INSTANCES")
    action_cooldown_mins: float = Field(
        30.0, ge=0, le=WEEK_MINS, validation_alias="LAMBDA_LABS_ACTION_COOLDOWN_MINS"
    )
    confirmation_threshold: float = Field(
        100.0,
        ge=0,
        le=MAX_USD_PER_HOUR,
        validation_alias="LAMBDA_LABS_CONFIRMATION_THRESHOLD",
        description="An action whose cost impact ($/h) exceeds this waits for approval",
    )
    confirmation_timeout_mins: float = Field(
        5.0, gt=0, le=WEEK_MINS, validation_alias="LAMBDA_LABS_CONFIRMATION_TIMEOUT_MINS"
    )
    boot_timeout_mins: float = Field(
        30.0,
        ge=1,
        le=WEEK_MINS,
        validation_alias="LAMBDA_LABS_BOOT_TIMEOUT_MINS",
        description="A launch still booting this long, or unhealthy half as long, is terminated "
        "(RunPod and Vast.ai bill a pod that never boots, or one in ERROR)",
    )
    default_instance_type: str = Field(
        "gpu_1x_a100", validation_alias="LAMBDA_LABS_DEFAULT_INSTANCE_TYPE"
    )
    region: str = Field("us-east-1", validation_alias="LAMBDA_LABS_REGION")
    ssh_key_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias="LAMBDA_LABS_SSH_KEY_NAMES",
        description="Comma-separated SSH key names for launches (Lambda requires one)",
    )
    high_gpu_threshold: float = Field(
        80.0, ge=0, le=100, validation_alias="LAMBDA_LABS_HIGH_GPU_THRESHOLD"
    )
    low_gpu_threshold: float = Field(
        20.0, ge=0, le=100, validation_alias="LAMBDA_LABS_LOW_GPU_THRESHOLD"
    )
    high_usage_duration_mins: float = Field(
        15.0, gt=0, le=WEEK_MINS, validation_alias="LAMBDA_LABS_HIGH_USAGE_DURATION_MINS"
    )
    low_usage_duration_mins: float = Field(
        30.0, gt=0, le=WEEK_MINS, validation_alias="LAMBDA_LABS_LOW_USAGE_DURATION_MINS"
    )
    hot_temperature_c: float = Field(
        85.0, ge=0, le=200, validation_alias="LAMBDA_LABS_HOT_TEMPERATURE_C"
    )
    scan_interval_s: float = Field(
        60.0, gt=0, le=DAY_S, validation_alias="LAMBDA_LABS_SCAN_INTERVAL_S"
    )
    dry_run: bool = Field(
        True,
        validation_alias="LAMBDA_LABS_DRY_RUN",
        description="Decide, audit and notify, but never call the cloud (`fleet run --live`)",
    )
    node_port: int = Field(9876, ge=1, le=65535, validation_alias="LAMBDA_LABS_NODE_PORT")
    node_token: SecretStr | None = Field(
        None,
        validation_alias="LAMBDA_LABS_NODE_TOKEN",
        description="Bearer token of the GPU nodes (their GPU_WORKER_TOKEN)",
    )
    node_timeout_s: float = Field(5.0, gt=0, le=600, validation_alias="LAMBDA_LABS_NODE_TIMEOUT_S")
    node_lease_s: float = Field(
        900.0,
        gt=0.1,  # as the node takes it (`POST /lease`): one it refuses is never armed
        le=MAX_LEASE_S,
        validation_alias="LAMBDA_LABS_NODE_LEASE_S",
        description="Dead-man lease held on each node: a node not renewed this long stops itself",
    )
    prometheus_url: str | None = Field(
        None,
        validation_alias="FLEET_PROMETHEUS_URL",
        description="Read the figures from this Prometheus (scraping dcgm-exporter, instances "
        "matched by the `instance` label's host = the instance's IP); unset: read the nodes",
    )
    sample_retention_h: float = Field(
        48.0, gt=0, le=24 * 366, validation_alias="LAMBDA_LABS_SAMPLE_RETENTION_H"
    )
    max_launch_attempts: int = Field(
        5, ge=1, le=100, validation_alias="LAMBDA_LABS_MAX_LAUNCH_ATTEMPTS"
    )
    slack_webhook_url: SecretStr | None = Field(None, validation_alias="SLACK_WEBHOOK_URL")
    slack_timeout_s: float = Field(5.0, gt=0, le=600, validation_alias="SLACK_TIMEOUT_S")
    audit_log: str = Field("fleet-audit.jsonl", validation_alias="LAMBDA_LABS_AUDIT_LOG")
    audit_git: str | None = Field(None, validation_alias="LAMBDA_LABS_AUDIT_GIT")
    lease_s: float = Field(120.0, gt=1, le=DAY_S, validation_alias="LAMBDA_LABS_CONTROLLER_LEASE_S")
    scan_timeout_s: float | None = Field(
        None,
        gt=0,
        le=DAY_S,
        validation_alias="FLEET_SCAN_TIMEOUT_S",
        description="One scan running longer (a cloud call that hangs) is abandoned: it acts on "
        "nothing more, lets the fleet lease go and the next scan starts afresh; unset: "
        f"{SCAN_LEASES:g} times LAMBDA_LABS_CONTROLLER_LEASE_S",
    )
    fleet_name: str = Field("default", max_length=100, validation_alias="LAMBDA_LABS_FLEET_NAME")
    policy: Literal["seed", "procure"] = Field(
        "seed",
        validation_alias="FLEET_POLICY",
        description="seed: scale on sustained GPU utilisation; procure: on the job queue "
        "(FLEET_QUEUE_URL) and the provider's billing increment",
    )
    queue_wait_target_min: float = Field(
        30.0,
        ge=0,
        le=WEEK_MINS,
        validation_alias="FLEET_QUEUE_WAIT_TARGET_MIN",
        description="procure policy: how long a queued job may wait before a launch for it",
    )
    queue_url: SecretStr | None = Field(
        None,
        validation_alias="FLEET_QUEUE_URL",
        description='procure policy: GET answers {"jobs": [{"gpus": 2, "waitingS": 130}, ...]}, '
        "the scheduler's pending jobs; unset: an empty queue",
    )
    queue_token: SecretStr | None = Field(
        None, validation_alias="FLEET_QUEUE_TOKEN", description="Bearer token for FLEET_QUEUE_URL"
    )
    queue_timeout_s: float = Field(5.0, gt=0, le=60, validation_alias="FLEET_QUEUE_TIMEOUT_S")

    @field_validator("ssh_key_names", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))

    @field_validator(
        "slack_webhook_url",
        "node_token",
        "audit_git",
        "prometheus_url",
        "queue_url",
        "queue_token",
        "scan_timeout_s",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return blank_is_unset(value)

    @field_validator("policy", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("prometheus_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("slack_webhook_url", "queue_url")
    @classmethod
    def _webhook(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            http_url(value.get_secret_value())  # its message never repeats the URL
        return value

    @property
    def scan_limit_s(self) -> float:
        """How long one scan may run before it is abandoned (`scan_timeout_s`, else a few
        leases: the lease is renewed while a scan runs, so without a limit a cloud call that
        hangs would hold the fleet for ever, nobody acting on it)."""
        return (
            self.scan_timeout_s if self.scan_timeout_s is not None else SCAN_LEASES * self.lease_s
        )

    def node_lease_short(self, interval_s: float) -> str | None:
        """Why the nodes' dead-man lease is too short for scans `interval_s` apart, or None. Each
        scan renews it; one renewal follows the last after the interval and a scan's length."""
        if self.node_lease_s >= NODE_LEASE_SCANS * interval_s:
            return None
        lapses = "whenever a scan is late" if self.node_lease_s > interval_s else "between scans"
        return (
            f"LAMBDA_LABS_NODE_LEASE_S ({self.node_lease_s:g} s) lapses {lapses} ({interval_s:g} "
            "s apart), and a node whose lease lapses stops its instance (GPU_WORKER_ON_ORPHAN): "
            f"set it to {NODE_LEASE_SCANS * interval_s:g} s or more, or scan more often"
        )

    @model_validator(mode="after")
    def _consistent(self) -> FleetSettings:
        if self.min_instances > self.max_instances:
            raise ValueError("LAMBDA_LABS_MIN_INSTANCES must not exceed LAMBDA_LABS_MAX_INSTANCES")
        if self.low_gpu_threshold > self.high_gpu_threshold:
            raise ValueError(
                "LAMBDA_LABS_LOW_GPU_THRESHOLD must not exceed LAMBDA_LABS_HIGH_GPU_THRESHOLD"
            )
        return self

    @model_validator(mode="after")
    def _secrets_never_shown(self) -> FleetSettings:
        # The node token goes to every node, the webhook and queue URLs carry their own keys:
        # whatever outside text echoes one (a node's error on /api/nodes), it is not shown.
        remember_secret(*secret_values(self))
        return self
