"""The fleet controller's configuration, with seed 004's names and defaults."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class FleetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    max_hourly_spend: float = Field(100.0, ge=0, validation_alias="LAMBDA_LABS_MAX_HOURLY_SPEND")
    max_instances: int = Field(10, ge=0, validation_alias="LAMBDA_LABS_MAX_INSTANCES")
    min_instances: int = Field(0, ge=0, validation_alias="LAMBDA_LABS_MIN_INSTANCES")
    action_cooldown_mins: float = Field(
        30.0, ge=0, validation_alias="LAMBDA_LABS_ACTION_COOLDOWN_MINS"
    )
    confirmation_threshold: float = Field(
        100.0,
        validation_alias="LAMBDA_LABS_CONFIRMATION_THRESHOLD",
        description="An action whose cost impact ($/h) exceeds this waits for approval",
    )
    confirmation_timeout_mins: float = Field(
        5.0, gt=0, validation_alias="LAMBDA_LABS_CONFIRMATION_TIMEOUT_MINS"
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
        15.0, gt=0, validation_alias="LAMBDA_LABS_HIGH_USAGE_DURATION_MINS"
    )
    low_usage_duration_mins: float = Field(
        30.0, gt=0, validation_alias="LAMBDA_LABS_LOW_USAGE_DURATION_MINS"
    )
    hot_temperature_c: float = Field(85.0, validation_alias="LAMBDA_LABS_HOT_TEMPERATURE_C")
    scan_interval_s: float = Field(60.0, gt=0, validation_alias="LAMBDA_LABS_SCAN_INTERVAL_S")
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
    node_timeout_s: float = Field(5.0, gt=0, validation_alias="LAMBDA_LABS_NODE_TIMEOUT_S")
    node_lease_s: float = Field(
        900.0,
        gt=0,
        validation_alias="LAMBDA_LABS_NODE_LEASE_S",
        description="Dead-man lease held on each node: a node not renewed this long stops itself",
    )
    prometheus_url: str | None = Field(
        None,
        validation_alias="FLEET_PROMETHEUS_URL",
        description="Read the figures from this Prometheus (scraping dcgm-exporter, instances "
        "matched by the `instance` label's host = the instance's IP); unset: read the nodes",
    )
    sample_retention_h: float = Field(48.0, gt=0, validation_alias="LAMBDA_LABS_SAMPLE_RETENTION_H")
    max_launch_attempts: int = Field(5, ge=1, validation_alias="LAMBDA_LABS_MAX_LAUNCH_ATTEMPTS")
    slack_webhook_url: SecretStr | None = Field(None, validation_alias="SLACK_WEBHOOK_URL")
    slack_timeout_s: float = Field(5.0, gt=0, validation_alias="SLACK_TIMEOUT_S")
    audit_log: str = Field("fleet-audit.jsonl", validation_alias="LAMBDA_LABS_AUDIT_LOG")
    audit_git: str | None = Field(None, validation_alias="LAMBDA_LABS_AUDIT_GIT")
    lease_s: float = Field(120.0, gt=1, validation_alias="LAMBDA_LABS_CONTROLLER_LEASE_S")
    fleet_name: str = Field("default", max_length=100, validation_alias="LAMBDA_LABS_FLEET_NAME")

    @field_validator("ssh_key_names", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator(
        "slack_webhook_url", "node_token", "audit_git", "prometheus_url", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value
