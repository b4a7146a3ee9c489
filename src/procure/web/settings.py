"""The dashboard's own configuration: whether reads are open to anyone with a token set."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    public_read: bool = Field(
        False,
        validation_alias="PROCURE_PUBLIC_READ",
        description="With PROCURE_API_TOKEN set, let anyone read the dashboard (not mutate)",
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, validation_alias="PROCURE_SESSION_HOURS")
