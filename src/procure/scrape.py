"""The one rule for `/metrics` on every process (`serve`, `gpu-worker`): a scrape presents
`Authorization: Bearer <PROCURE_METRICS_TOKEN>` (or the process's own token); a process with
neither token set answers anyone (a loopback development set-up)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from procure.bearer import bearer_matches
from procure.settings import CHECKED, blank_is_unset


class ScrapeSettings(BaseSettings):
    model_config = CHECKED

    metrics_token: SecretStr | None = Field(None, validation_alias="PROCURE_METRICS_TOKEN")

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _blank(cls, value: object) -> object:
        return blank_is_unset(value)


def scrape_allowed(
    authorization: str | None, metrics_token: SecretStr | None, own_token: SecretStr | None
) -> bool:
    """Whether a scrape with this `Authorization` header may read /metrics: the scrape token
    (Prometheus' `authorization: {credentials_file: ...}`) or the process's own token opens
    it; with neither configured it is open."""
    tokens = [t.get_secret_value() for t in (metrics_token, own_token) if t is not None]
    return not tokens or any(bearer_matches(authorization, token) for token in tokens)
