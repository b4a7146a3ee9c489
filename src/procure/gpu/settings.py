"""The GPU worker's configuration, from the environment or `.env` (seed 003's names where it has
them): its token, the Ollama server, the orchestrator to register with and the dead-man switch."""

from __future__ import annotations

import hmac
import re
import socket
from typing import Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.settings import CHECKED, finite_numbers, http_url

# The longest dead-man lease a node takes (`POST /lease`): the fleet's LAMBDA_LABS_NODE_LEASE_S is
# bounded by it, so a renewal the fleet sends is never one the node refuses.
MAX_LEASE_S = 7 * 86400.0


def default_capability_name() -> str:
    """`agent-net-<host>`: the seed's per-orchestrator capability name (e.g. agent-net-nyc)."""
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "node"
    return f"agent-net-{host[:40]}"


def capability_token(node_token: str) -> str:
    """The token registered with the orchestrator for the capability: derived from the node's
    own, it opens only what the orchestrator forwards (/gpu-check, /agent-net, /models), never
    jobs or the dead-man lease, so a pool the owner registers with cannot run commands."""
    return hmac.new(node_token.encode(), b"procure livepeer capability", "sha256").hexdigest()


class GpuWorkerSettings(BaseSettings):
    # A refused value is never echoed: the token and the orphan command are secrets.
    model_config = SettingsConfigDict(**CHECKED, populate_by_name=True, hide_input_in_errors=True)

    token: SecretStr | None = Field(
        None,
        validation_alias="GPU_WORKER_TOKEN",
        description="Bearer token for every route but /healthz (unset: open); the "
        "orchestrator is given one derived from it that opens the capability's routes only",
    )
    nvml_cache_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        validation_alias="GPU_WORKER_NVML_CACHE_S",
        description="NVML is read at most once per this many seconds, however many requests",
    )
    nvml_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        validation_alias="GPU_WORKER_NVML_TIMEOUT_S",
        description="How long a request waits for NVML; past it, the node answers that NVML "
        "does not (a GPU fallen off the bus can hang NVML for minutes)",
    )
    ollama_url: str | None = Field(
        None, validation_alias="OLLAMA_URL", description="e.g. http://ollama:11434 (unset: none)"
    )
    ollama_timeout_s: float = Field(3.0, gt=0, le=600, validation_alias="OLLAMA_TIMEOUT_S")
    orchestrator_url: str | None = Field(
        None,
        validation_alias="ORCHESTRATOR_URL",
        description="go-livepeer orchestrator to register with, e.g. https://orch:8935 (unset: "
        "no registration)",
    )
    orchestrator_secret: SecretStr | None = Field(None, validation_alias="ORCHESTRATOR_SECRET")
    orchestrator_insecure_tls: bool = Field(
        False,
        validation_alias="ORCHESTRATOR_INSECURE_TLS",
        description="Accept the orchestrator's self-signed certificate (only when set)",
    )
    orchestrator_timeout_s: float = Field(
        5.0, gt=0, le=600, validation_alias="ORCHESTRATOR_TIMEOUT_S"
    )
    register_every_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        validation_alias="CAPABILITY_REFRESH_S",
        description="Register again this often, so an orchestrator that restarted knows us again",
    )
    retry_min_s: float = Field(0.5, gt=0, le=3600, validation_alias="CAPABILITY_RETRY_MIN_S")
    retry_max_s: float = Field(60.0, gt=0, le=86400, validation_alias="CAPABILITY_RETRY_MAX_S")
    capability_name: str = Field(
        default_factory=default_capability_name,
        min_length=1,
        max_length=100,
        validation_alias="CAPABILITY_NAME",
    )
    capability_description: str = Field(
        "GPU health and model listing (BYOC)", validation_alias="CAPABILITY_DESCRIPTION"
    )
    capability_url: str | None = Field(
        None,
        validation_alias="CAPABILITY_URL",
        description="Where the orchestrator sends jobs (default http://<hostname>:<port>)",
    )
    capability_capacity: int = Field(10, ge=1, le=1_000_000, validation_alias="CAPABILITY_CAPACITY")
    capability_price_per_unit: int = Field(
        0, ge=0, lt=2**63, validation_alias="CAPABILITY_PRICE_PER_UNIT"
    )
    capability_price_scaling: int = Field(
        1, ge=0, lt=2**63, validation_alias="CAPABILITY_PRICE_SCALING"
    )
    capability_currency: str = Field("wei", validation_alias="CAPABILITY_CURRENCY")
    on_orphan: SecretStr | None = Field(
        None,
        validation_alias="GPU_WORKER_ON_ORPHAN",
        description="Shell command run when the controller's lease lapses, e.g. "
        "`shutdown -h now` (unset: no dead-man switch). Secret: it may carry a cloud API key",
    )
    orphan_action_timeout_s: float = Field(
        60.0, gt=0, le=3600, validation_alias="GPU_WORKER_ORPHAN_TIMEOUT_S"
    )

    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))

    @field_validator("ollama_url", "orchestrator_url", "capability_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    jobs_max_running: int = Field(
        1,
        ge=1,
        le=64,
        validation_alias="GPU_WORKER_JOBS_MAX_RUNNING",
        description="Jobs that run at once; the others wait, queued",
    )
    jobs_keep: int = Field(
        50,
        ge=1,
        le=10_000,
        validation_alias="GPU_WORKER_JOBS_KEEP",
        description="Jobs kept in memory; the oldest finished one is forgotten first",
    )
    job_log_lines: int = Field(
        2_000, ge=10, le=1_000_000, validation_alias="GPU_WORKER_JOB_LOG_LINES"
    )
    job_line_bytes: int = Field(
        4_096, ge=80, le=65_536, validation_alias="GPU_WORKER_JOB_LINE_BYTES"
    )
    job_cancel_grace_s: float = Field(
        10.0,
        gt=0,
        le=3_600,
        validation_alias="GPU_WORKER_JOB_CANCEL_GRACE_S",
        description="SIGTERM, then SIGKILL after this many seconds",
    )
    checkpoint_dir: str = Field(
        "~/.cache/procure/checkpoints",
        min_length=1,
        validation_alias="GPU_WORKER_CHECKPOINT_DIR",
        description="Where a job writes its checkpoints when the request names no "
        "checkpointDir (a local directory or any fsspec URL); one folder per job under it",
    )
    docker_binary: str = Field(
        "docker",
        min_length=1,
        validation_alias="GPU_WORKER_DOCKER",
        description="The docker client that runs jobs given with an image",
    )
    docker_gpus: str | None = Field(
        "all",
        validation_alias="GPU_WORKER_DOCKER_GPUS",
        description="`docker run --gpus` for jobs given with an image (empty: no --gpus, for "
        "a machine without the NVIDIA container toolkit)",
    )

    @field_validator(
        "token",
        "ollama_url",
        "orchestrator_url",
        "orchestrator_secret",
        "capability_url",
        "on_orphan",
        "docker_gpus",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # docker compose passes `${VAR:-}` as an empty string: an empty token must not become a
        # token that "Bearer " matches, nor an empty stop action an armed switch.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if isinstance(text, str) and not text.strip() else value

    @field_validator("capability_name", mode="before")
    @classmethod
    def _blank_name_is_default(cls, value: Any) -> Any:
        return default_capability_name() if isinstance(value, str) and not value.strip() else value

    @field_validator("checkpoint_dir", "docker_binary", mode="before")
    @classmethod
    def _blank_job_setting_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str) and not value.strip():
            return cls.model_fields[info.field_name or ""].default
        return value
