"""The cloud accounts procure can drive, by provider: which have a key in the environment, and a
client for each. The one place that knows every provider's folder; callers name a provider."""

from __future__ import annotations

import os

from procure.clouds.base import PROVIDERS, Provider, RentalCloud

KEY_VARS: dict[Provider, str] = {
    "lambda": "LAMBDA_API_KEY",
    "runpod": "RUNPOD_API_KEY",
    "vast": "VAST_API_KEY",
}
URL_VARS: dict[Provider, str] = {
    "lambda": "LAMBDA_API_URL",
    "runpod": "RUNPOD_API_URL",
    "vast": "VAST_API_URL",
}


class UnknownProvider(ValueError):
    pass


def provider(name: str) -> Provider:
    """`name` as a provider, or UnknownProvider with the choices."""
    if name not in PROVIDERS:
        raise UnknownProvider(f"unknown cloud {name!r}: choose one of {', '.join(PROVIDERS)}")
    return name  # type: ignore[return-value]


def has_key(name: Provider) -> bool:
    """Whether the environment (or `.env`, read by each client's settings) sets this key."""
    if os.environ.get(KEY_VARS[name], "").strip():
        return True
    key = getattr(_settings(name), "api_key", None)
    return key is not None and bool(key.get_secret_value().strip())


def _settings(name: Provider) -> object:
    if name == "lambda":
        from procure.clouds.lambda_cloud.settings import LambdaSettings

        return LambdaSettings()
    if name == "runpod":
        from procure.clouds.runpod.settings import RunPodSettings

        return RunPodSettings()
    from procure.clouds.vast.settings import VastSettings

    return VastSettings()


def make_cloud(
    name: Provider, *, api_key: str | None = None, api_url: str | None = None
) -> RentalCloud:
    """A client of one provider, from its settings (`<P>_API_KEY`, `<P>_API_URL`) unless given."""
    overrides: dict[str, str] = {}
    if api_key is not None:
        overrides[KEY_VARS[name]] = api_key
    if api_url is not None:
        overrides[URL_VARS[name]] = api_url
    if name == "lambda":
        from procure.clouds.lambda_cloud.client import LambdaCloud
        from procure.clouds.lambda_cloud.settings import LambdaSettings

        return LambdaCloud(LambdaSettings(**overrides))  # type: ignore[return-value]
    if name == "runpod":
        from procure.clouds.runpod.client import RunPodCloud
        from procure.clouds.runpod.settings import RunPodSettings

        return RunPodCloud(RunPodSettings(**overrides))  # type: ignore[return-value]
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.settings import VastSettings

    return VastCloud(VastSettings(**overrides))  # type: ignore[return-value]


def configured_clouds() -> dict[Provider, RentalCloud]:
    """A client for every provider whose key is set."""
    return {name: make_cloud(name) for name in PROVIDERS if has_key(name)}
