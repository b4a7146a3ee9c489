"""The agent's cloud accounts from the environment: one client per provider whose key is set
(LAMBDA_API_KEY, RUNPOD_API_KEY, VAST_API_KEY, base URLs overridable by each client's settings);
each key is read by its own provider's settings and goes to that provider alone."""

from __future__ import annotations

from procure.clouds.base import RentalCloud


def clouds_from_env() -> dict[str, RentalCloud]:
    """A `RentalCloud` per provider with a key configured, by provider."""
    from procure.clouds.lambda_cloud.client import LambdaCloud
    from procure.clouds.lambda_cloud.settings import LambdaSettings
    from procure.clouds.runpod.client import RunPodCloud
    from procure.clouds.runpod.settings import RunPodSettings
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.settings import VastSettings

    clients: dict[str, RentalCloud] = {}
    lam = LambdaSettings()
    if lam.api_key is not None and lam.api_key.get_secret_value():
        clients["lambda"] = LambdaCloud(lam)  # type: ignore[assignment]
    runpod = RunPodSettings()
    if runpod.api_key is not None and runpod.api_key.get_secret_value():
        clients["runpod"] = RunPodCloud(runpod)  # type: ignore[assignment]
    vast = VastSettings()
    if vast.api_key is not None and vast.api_key.get_secret_value():
        clients["vast"] = VastCloud(vast)  # type: ignore[assignment]
    return clients


async def close_clouds(clients: dict[str, RentalCloud]) -> None:
    for client in clients.values():
        await client.aclose()
