"""What the fleet controller needs of a cloud, whatever the provider: instance types with prices
and capacity, instances, launch and terminate; and the errors it must tell apart. Each provider's
client (`clouds/lambda_cloud/`) implements `Cloud`; the fleet imports only this module's names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

InstanceStatus = Literal["booting", "active", "unhealthy", "terminating", "terminated", "preempted"]


@dataclass(frozen=True)
class InstanceType:
    name: str  # e.g. gpu_1x_a100
    description: str
    gpus: int
    price_per_hour: int  # micro-USD
    regions_with_capacity: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Instance:
    id: str
    name: str | None  # the controller names each launch after its action id (exactly once)
    status: InstanceStatus
    instance_type: str
    region: str
    ip: str | None  # where its GPU node answers (the node's port is the controller's setting)
    price_per_hour: int  # micro-USD
    gpus: int = 1


class CloudError(Exception):
    """The cloud refused or failed. `retryable`: worth trying again later (provider trouble,
    rate limit, no answer); not for capacity, quota or a bad key."""

    retryable: bool = False


class CapacityError(CloudError):
    """No capacity for that instance type in that region now."""


class QuotaError(CloudError):
    """The account's quota (or instance limit) would be exceeded."""


class AuthError(CloudError):
    """The API key is missing, wrong or revoked."""


class ProviderError(CloudError):
    """Provider trouble (5xx, timeout, garbage, rate limited): try again later."""

    retryable = True


class Cloud(Protocol):
    async def instance_types(self) -> list[InstanceType]: ...

    async def instances(self) -> list[Instance]: ...

    async def launch(
        self, *, instance_type: str, region: str, name: str, ssh_key_names: list[str]
    ) -> list[str]:
        """Launch one instance named `name`; its id(s)."""
        ...

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        """Terminate (idempotent: an instance already gone is not an error)."""
        ...

    async def aclose(self) -> None: ...
