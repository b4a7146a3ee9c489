"""The Vast.ai client's configuration: the API key and base URL from the environment or `.env`
(`VAST_API_KEY`, `VAST_API_URL`), the deadline of each call and how fast to pace calls."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.settings import CHECKED, finite_numbers, http_url

DEFAULT_URL = "https://console.vast.ai"


class VastSettings(BaseSettings):
    # A refused value is never echoed (the key is a secret); numbers must be finite.
    model_config = SettingsConfigDict(**CHECKED, populate_by_name=True, hide_input_in_errors=True)
    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))
    _url = field_validator("api_url")(classmethod(lambda cls, v: http_url(v)))

    api_key: SecretStr | None = Field(
        None, validation_alias="VAST_API_KEY", description="Vast.ai API key (secret)"
    )
    api_url: str = Field(
        DEFAULT_URL,
        validation_alias="VAST_API_URL",
        description="Base URL (the mock cloud: http://127.0.0.1:4300)",
    )
    timeout_s: float = Field(
        30.0, gt=0, le=600, validation_alias="VAST_API_TIMEOUT_S", description="Per call, all in"
    )
    pace_scale: float = Field(
        1.0,
        ge=0,
        le=100,
        validation_alias="VAST_PACE_SCALE",
        description="Multiplies Vast's per-endpoint minimum intervals (0: no pacing, for a mock)",
    )
    rate_limit_retries: int = Field(
        2,
        ge=0,
        le=5,
        validation_alias="VAST_RATE_LIMIT_RETRIES",
        description="A 429 is waited out (client-side back-off) and retried this many times",
    )
    node_port: int = Field(
        9876, ge=1, le=65535, validation_alias="VAST_NODE_PORT", description="GPU node's port"
    )
    image: str = Field(
        "vastai/base-image:@vastai-automatic-tag",
        validation_alias="VAST_IMAGE",
        description="Image for fleet launches (which give none)",
    )
