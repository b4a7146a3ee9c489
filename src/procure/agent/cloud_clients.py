"""The agent's cloud accounts from the environment: one client per provider whose key is set
(LAMBDA_API_KEY, RUNPOD_API_KEY, VAST_API_KEY, base URLs overridable by each client's settings);
each key is read by its own provider's settings and goes to that provider alone."""

from __future__ import annotations

from procure.clouds.base import RentalCloud
from procure.clouds.registry import configured_clouds


def clouds_from_env() -> dict[str, RentalCloud]:
    """A `RentalCloud` per provider with a key configured, by provider."""
    return dict(configured_clouds())


async def close_clouds(clients: dict[str, RentalCloud]) -> None:
    for client in clients.values():
        await client.aclose()
