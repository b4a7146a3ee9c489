"""The RunPod client's configuration: the API key and base URL from the environment or `.env`
(`RUNPOD_API_KEY`, `RUNPOD_API_URL`), each call's deadline, and what a fleet launch starts."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.settings import CHECKED, finite_numbers, http_url

DEFAULT_URL = "https://api.runpod.io"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"


class RunPodSettings(BaseSettings):
    # A refused value is never echoed (the key is a secret); numbers must be finite.
    model_config = SettingsConfigDict(**CHECKED, populate_by_name=True, hide_input_in_errors=True)
    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))
    _url = field_validator("api_url")(classmethod(lambda cls, v: http_url(v)))

    api_key: SecretStr | None = Field(
        None, validation_alias="RUNPOD_API_KEY", description="RunPod API key (secret)"
    )
    api_url: str = Field(
        DEFAULT_URL,
        validation_alias="RUNPOD_API_URL",
        description="Base URL (the mock cloud: http://127.0.0.1:4200)",
    )
    timeout_s: float = Field(
        30.0, gt=0, le=600, validation_alias="RUNPOD_API_TIMEOUT_S", description="Per call, all in"
    )
    node_port: int = Field(
        9876, ge=1, le=65535, validation_alias="RUNPOD_NODE_PORT", description="GPU node's port"
    )
    image: str = Field(
        DEFAULT_IMAGE,
        validation_alias="RUNPOD_IMAGE",
        description="Container image of a fleet launch (one without a LaunchSpec)",
    )
