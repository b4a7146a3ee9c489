"""The Lambda Cloud client's configuration: the API key and base URL from the environment or
`.env` (`LAMBDA_API_KEY`, `LAMBDA_API_URL`), the deadline of each call, and what a launch needs
(the account's SSH key name, the port the GPU node listens on in each instance)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.settings import CHECKED, finite_numbers, http_url

DEFAULT_URL = "https://cloud.lambda.ai"


class LambdaSettings(BaseSettings):
    # A refused value is never echoed (the key is a secret); numbers must be finite.
    model_config = SettingsConfigDict(**CHECKED, populate_by_name=True, hide_input_in_errors=True)
    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))
    _url = field_validator("api_url")(classmethod(lambda cls, v: http_url(v)))

    api_key: SecretStr | None = Field(
        None, validation_alias="LAMBDA_API_KEY", description="Lambda Cloud API key (secret)"
    )
    api_url: str = Field(
        DEFAULT_URL,
        validation_alias="LAMBDA_API_URL",
        description="Base URL (the mock cloud: http://127.0.0.1:4100)",
    )
    timeout_s: float = Field(
        30.0, gt=0, le=600, validation_alias="LAMBDA_API_TIMEOUT_S", description="Per call, all in"
    )
    ssh_key_name: str = Field(
        "procure",
        min_length=1,
        max_length=200,
        validation_alias="LAMBDA_SSH_KEY_NAME",
        description="The SSH key (registered in the Lambda account) each launch names",
    )
    node_port: int = Field(
        9876,
        ge=1,
        le=65535,
        validation_alias="LAMBDA_NODE_PORT",
        description="Where each instance's GPU node answers (the firewall must open it)",
    )
