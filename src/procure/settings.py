"""Configuration from the environment or `.env`, honouring the seeds' variable names; and the
checks every settings class shares (finite bounded numbers, well-formed URLs, blank = unset)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.numbers import finite_before
from procure.safetext import remember_secret

_NUMERIC = (int, float, int | None, float | None)
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")  # whitespace, control characters, backslashes


def http_url(value: str) -> str:
    """`value` when it is an absolute http(s) URL with a host (and a valid port), without
    spaces, control characters, backslashes or a fragment; else ValueError
    (whose message never repeats the value: it may hold a secret)."""
    text = value.strip()
    if not text or len(text) > 2048 or _UNSAFE.search(text):
        raise ValueError("not a URL (empty, too long, or spaces/control characters)")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL")
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number in range
    except ValueError:
        raise ValueError("the URL's port is not a number from 1 to 65535") from None
    if not parts.hostname or parts.fragment:
        raise ValueError("not a URL with a host (or it has a fragment)")
    return text


def finite_numbers(cls: type[BaseSettings], value: Any, info: ValidationInfo) -> Any:
    """A `field_validator("*", mode="before")` body: every number setting of `cls` must be a
    plain finite decimal (no nan, inf, 1e400 or expression); other fields pass through."""
    field = cls.model_fields.get(info.field_name or "")
    if field is not None and field.annotation in _NUMERIC:
        if isinstance(value, str) and not value.strip() and field.annotation in _NUMERIC[2:]:
            return None
        return finite_before(value)
    return value


def blank_is_unset(value: Any) -> Any:
    """docker compose passes `${VAR:-}` and `.env.example` has `NAME=`: empty means unset."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    return None if isinstance(text, str) and not text.strip() else value


# Every settings class: no infinities, and a refused value is never echoed (it may be a secret).
CHECKED = SettingsConfigDict(env_file=".env", extra="ignore", allow_inf_nan=False)


_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
# secp256k1's group order: a private key is a number in [1, order).
_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def secret_values(settings: BaseSettings) -> list[str]:
    """The values of a settings object's secret fields (for `safetext.remember_secret`)."""
    return [v.get_secret_value() for v in settings.__dict__.values() if isinstance(v, SecretStr)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(**CHECKED, hide_input_in_errors=True)

    database_url: str = Field(
        "sqlite:///procure.db",
        validation_alias=AliasChoices("PROCURE_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL: sqlite:///file.db or postgresql+psycopg://user@host/db",
    )
    home: Path = Field(
        Path(".procure"),
        validation_alias="PROCURE_HOME",
        description="Where the wallet key and the facilitator's chain journal are kept",
    )
    api_token: SecretStr | None = Field(
        None, validation_alias="PROCURE_API_TOKEN", description="Bearer token for mutating routes"
    )
    planner_mode: Literal["stub", "heuristic", "llm"] = Field(
        "heuristic", validation_alias="PLANNER_MODE"
    )
    gpu_vendor_secret: SecretStr = Field(
        SecretStr("dev_secret_123"), validation_alias="GPU_VENDOR_SECRET"
    )
    facilitator_url: str = Field("http://127.0.0.1:4020", validation_alias="X402_FACILITATOR_URL")
    x402_private_key: SecretStr | None = Field(None, validation_alias="X402_PRIVATE_KEY")
    wallet_funding_usd: float = Field(
        1000.0,
        ge=0,
        le=1e9,
        validation_alias="PROCURE_WALLET_FUNDING",
        description="Faucet amount per wallet",
    )
    # The LLM planner: each provider has its own model setting (and key, where it takes one)
    llm_provider: Literal["fireworks", "ollama", "vllm", "openai"] | None = Field(
        None,
        validation_alias="LLM_PROVIDER",
        description="fireworks, ollama, vllm or openai (unset: from LLM_BASE_URL, else fireworks)",
    )
    fireworks_api_key: SecretStr | None = Field(None, validation_alias="FIREWORKS_API_KEY")
    fireworks_model: str = Field(
        "accounts/fireworks/models/llama-v3-8b-instruct",
        min_length=1,
        max_length=200,
        validation_alias="FIREWORKS_MODEL",
    )
    ollama_model: str = Field(
        "llama3.1:8b", min_length=1, max_length=200, validation_alias="OLLAMA_MODEL"
    )
    vllm_model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        validation_alias="VLLM_MODEL",
        description="The model vLLM serves (its --model); needed with LLM_PROVIDER=vllm",
    )
    vllm_api_key: SecretStr | None = Field(None, validation_alias="VLLM_API_KEY")
    openai_model: str = Field(
        "gpt-4o-mini", min_length=1, max_length=200, validation_alias="OPENAI_MODEL"
    )
    openai_api_key: SecretStr | None = Field(None, validation_alias="OPENAI_API_KEY")
    llm_base_url: str | None = Field(
        None,
        validation_alias="LLM_BASE_URL",
        description="The endpoint's /v1 base URL (unset: the provider's usual one)",
    )
    llm_timeout_s: float = Field(20.0, gt=0, le=600, validation_alias="LLM_TIMEOUT_S")
    vendor_timeout_s: float = Field(10.0, gt=0, le=600, validation_alias="VENDOR_TIMEOUT_S")
    fail_vendor_id: str | None = Field(None, validation_alias="FAIL_VENDOR_ID")
    fail_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        validation_alias="FAIL_RATE",
        description="Share of FAIL_VENDOR_ID's jobs that fail (unset: all; 0: none)",
    )
    fail_at: float = Field(0.47, gt=0, lt=1, validation_alias="FAIL_AT")
    mock_job_seconds: float = Field(6.0, gt=0, le=7 * 86400, validation_alias="MOCK_JOB_SECONDS")
    vendor_cooldown_s: float = Field(
        300.0, ge=0, le=30 * 86400, validation_alias="VENDOR_COOLDOWN_S"
    )
    payment_overhead_usd: float = Field(
        0.05,
        ge=0,
        le=1e6,
        validation_alias="PAYMENT_OVERHEAD_USD",
        description="What one more x402 payment costs the planner (fees, latency, risk): "
        "it pays in slices only when that saves more than this per slice",
    )
    first_slice_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        validation_alias="PROCURE_FIRST_SLICE_FRACTION",
        description="A vendor that has not yet completed a job for procure is first paid for "
        "this share of the job's first slice (the whole job when paid at once), at least a "
        "minute of work; it gets normal slices once it has run. 1: no short first slice",
    )
    payment_window_s: float = Field(
        300.0,
        ge=15,
        le=7 * 86400,
        validation_alias="PROCURE_PAYMENT_WINDOW_S",
        description="How long a signed payment authorisation stays valid (its validBefore)",
    )
    api_lease_s: float = Field(
        15.0,
        ge=1,
        le=600,
        validation_alias="PROCURE_API_LEASE_S",
        description="Lease a tick through the API (or the CLI) holds on its run, renewed every "
        "third of it while the tick runs: after a crash mid-tick the run is free again this "
        "soon",
    )
    max_troubles: int = Field(
        30,
        ge=1,
        le=10_000,
        validation_alias="PROCURE_MAX_TRIES",
        description="Ticks in a row without a way forward (vendor errors, rejected quotes) "
        "before the job is given up or the run ends failed",
    )
    stall_s: float = Field(
        1800.0,
        gt=0,
        le=30 * 86400,
        validation_alias="PROCURE_STALL_S",
        description="A running job whose progress has not moved for this long is given up",
    )
    payment_margin_s: float = Field(
        30.0,
        ge=0,
        le=86400,
        validation_alias="PROCURE_PAYMENT_MARGIN_S",
        description="Clock skew allowed past validBefore before an unused authorisation is dead",
    )

    warning_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        validation_alias="PROCURE_WARNING_THRESHOLD",
        description="Share of every budget (a run's, the global ledger's, the fleet's caps) "
        "that warns once before the cap (procure.warnings)",
    )
    metrics_token: SecretStr | None = Field(
        None,
        validation_alias="PROCURE_METRICS_TOKEN",
        description="Scrape token for /metrics (unset: the API token; neither: open)",
    )

    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))

    @field_validator(
        "api_token",
        "metrics_token",
        "x402_private_key",
        "fireworks_api_key",
        "vllm_api_key",
        "openai_api_key",
        "vllm_model",
        "llm_provider",
        "llm_base_url",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return blank_is_unset(value)

    @field_validator("api_token", "metrics_token")
    @classmethod
    def _token_stripped(cls, value: SecretStr | None) -> SecretStr | None:
        # A token read from a secret file ends in a newline no client can send: the API was
        # locked to everyone.
        return None if value is None else SecretStr(value.get_secret_value().strip())

    @field_validator("facilitator_url", "llm_base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("x402_private_key")
    @classmethod
    def _private_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Checked here, never echoed: a malformed key would fail deep in every paying command.
        # Stripped: a key from a secret file often ends in a newline.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if not _PRIVATE_KEY.fullmatch(key) or not 0 < int(key, 16) < _CURVE_ORDER:
            raise ValueError("must be a private key: 64 hex digits, 0x optional")
        return SecretStr(key)

    @model_validator(mode="after")
    def _vllm_names_its_model(self) -> Settings:
        if self.llm_provider == "vllm" and not self.vllm_model:
            raise ValueError("VLLM_MODEL: LLM_PROVIDER=vllm needs the model vLLM serves")
        return self

    @model_validator(mode="after")
    def _secrets_never_shown(self) -> Settings:
        # Tokens and keys this process holds (the API's, the vendors' bearer, the wallet's key,
        # the LLMs' keys, the metrics token, the facilitator's password): whatever outside text
        # echoes one (a hostile vendor, a proxy's error page), it is not stored, shown or logged.
        remember_secret(*secret_values(self), urlsplit(self.facilitator_url).password)
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
