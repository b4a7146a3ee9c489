"""The dashboard's own configuration: whether reads are open to anyone with a token set."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from procure.settings import CHECKED, finite_numbers


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(**CHECKED)

    public_read: bool = Field(
        False,
        validation_alias="PROCURE_PUBLIC_READ",
        description="With PROCURE_API_TOKEN set, let anyone read the dashboard (not mutate)",
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, validation_alias="PROCURE_SESSION_HOURS")

    _finite = field_validator("*", mode="before")(classmethod(finite_numbers))
