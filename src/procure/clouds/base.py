"""What procure needs of a GPU cloud, whatever the provider: `Cloud` (the fleet controller's view:
instance types, instances, launch, terminate) and `RentalCloud` (the agent's and the gateway's view:
offers, launch by name from a spec, find by name, billing), and the errors they must tell apart.
Each provider's folder (`lambda_cloud/`, `runpod/`, `vast/`) implements both; callers import only
this module's names."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from procure.safetext import redact

# "active" is running. "preempted": the provider stopped it (a lost host, an outbid Vast.ai bid, a
# RunPod pod EXITED by the platform): the job on it is lost. "exited": its container ended.
InstanceStatus = Literal[
    "booting", "active", "unhealthy", "terminating", "terminated", "preempted", "exited"
]
Provider = Literal["lambda", "runpod", "vast"]
PROVIDERS: tuple[Provider, ...] = ("lambda", "runpod", "vast")
LABEL_PREFIX = "procure-"  # every instance procure launches is named (labelled) with this prefix


def http_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address bracketed (clouds give either kind)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
    # Where the instance's GPU node answers (scheme://host:port, from the provider's address and
    # port mapping), once it is running; None before. Checked before any token goes to it.
    node_url: str | None = None
    interruptible: bool = False
    gpu: str = ""  # canonical GPU model (see Offer.gpu), where the provider says
    # Stopped with its disk kept, and may run again (whatever its status says of the job on it):
    # paused by the provider (a Vast.ai balance run out, an outbid bid), stopped by the operator,
    # a RunPod pod EXITED. Not lost: destroying it would delete its disk.
    resumable: bool = False


@dataclass(frozen=True)
class Offer:
    """One thing that can be rented now. `offer_id` is what `launch` needs: a Lambda instance type,
    a RunPod GPU type id, a Vast.ai ask id."""

    provider: Provider
    offer_id: str
    gpu: str  # canonical model, upper case without vendor: "A100", "H100", "A10", "RTX4090"
    gpu_count: int
    region: str  # Lambda region, RunPod data centre id, Vast.ai geolocation
    price_per_hour: int  # micro-USD for the whole instance, all its GPUs
    interruptible: bool  # a Vast.ai bid; Lambda and RunPod REST v2 have none
    available: int  # how many can be launched now (1 where the provider only says yes or no)
    billing_increment_s: int  # 60 on Lambda, 1 on RunPod and Vast.ai
    min_bid_per_hour: int | None = None  # micro-USD, interruptible offers only


@dataclass(frozen=True)
class LaunchSpec:
    """What to launch. `name` is procure's idempotency key (always starting with LABEL_PREFIX):
    the instance's name on Lambda and RunPod, its label on Vast.ai."""

    name: str
    offer: Offer
    image: str | None = None  # container image (RunPod, Vast.ai); Lambda is a VM
    startup_script: str | None = None  # Lambda user_data, Vast.ai onstart, RunPod args
    env: dict[str, str] = field(default_factory=dict)
    bid_per_hour: int | None = None  # micro-USD; interruptible offers only (default: min bid)
    node_port: int = 9876  # where the GPU node listens inside the instance


class CloudError(Exception):
    """The cloud refused or failed. `retryable`: worth trying again later (provider trouble,
    rate limit, no answer); not for capacity, quota or a bad key."""

    retryable: bool = False

    def __init__(self, *args: object) -> None:
        # Its message is stored, logged and shown (to a gateway's buyers too): no secret a
        # provider or proxy echoed (any credential this process sent) may be in it.
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class CapacityError(CloudError):
    """No capacity for that instance type in that region now."""


class QuotaError(CloudError):
    """The account's quota (or instance limit) would be exceeded."""


class AuthError(CloudError):
    """The API key is missing, wrong or revoked."""


class ProviderError(CloudError):
    """Provider trouble (5xx, timeout, garbage, rate limited): try again later."""

    retryable = True


class RateLimited(ProviderError):
    """429: `retry_after_s` from the provider's Retry-After, or the client's own back-off."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def without_secrets(error: CloudError, secrets: Iterable[str]) -> CloudError:
    """`error` again, with no secret (an API key, a launch's env values such as the node token)
    in its message: a provider or proxy that echoes the request must not put one in ours."""
    text = str(error)
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "***")
    if isinstance(error, RateLimited):
        return RateLimited(text, error.retry_after_s)
    return type(error)(text)


class Cloud(Protocol):
    # Whether an instance this cloud has lost (and does not list resumable) stays on the account,
    # billing its disk, until it is destroyed: RunPod's and Vast.ai's do; Lambda's preempted one
    # is gone with its disk.
    lost_bills_disk: bool
    # How the cloud bills an instance (the fleet policy's paid increments): in steps of
    # `billing_increment_s` seconds, counted from its launch (`bills_boot`: RunPod, Vast.ai) or
    # from the end of its boot (Lambda). Each client says so of its own provider; one that does
    # not say whether it bills the boot is planned for as if it did, with a warning.
    billing_increment_s: int
    bills_boot: bool

    async def instance_types(self) -> list[InstanceType]: ...

    async def instances(self) -> list[Instance]: ...

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        """Launch one instance named `name`; its id(s). `max_price_per_hour` (micro-USD): what
        the rails checked; a cloud whose price for it is above that launches nothing and raises
        CapacityError (prices move; a cap is checked against what is launched)."""
        ...

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        """Terminate (idempotent: an instance already gone is not an error)."""
        ...

    async def aclose(self) -> None: ...


class RentalCloud(Protocol):
    """What the agent and the gateway need of a cloud account. Each call has its deadline; every
    failure is one of the errors above, never another exception."""

    provider: Provider
    billing_increment_s: int

    async def offers(self, *, gpu: str | None = None, gpu_count: int | None = None) -> list[Offer]:
        """Every offer (cheapest first), optionally of one GPU model and of `gpu_count` GPUs
        per instance (RunPod prices and stocks pods of that many: without it, of one)."""
        ...

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        """Launch one instance named `spec.name`. Not idempotent on the provider's side: callers
        call `find(spec.name)` first."""
        ...

    async def find(self, name: str) -> list[Instance]:
        """Instances (not yet terminated) carrying this name or label."""
        ...

    async def get(self, instance_id: str) -> Instance | None:
        """One instance, or None when the provider no longer knows it."""
        ...

    async def labelled(self) -> list[Instance]:
        """Every live instance whose name starts with LABEL_PREFIX (for the sweeper)."""
        ...

    async def terminate(self, instance_ids: list[str]) -> list[Instance]: ...

    async def billed(self, instance_id: str) -> int | None:
        """Micro-USD the provider has billed for this instance so far, from its billing endpoint
        (RunPod, Vast.ai); None where the provider has none (Lambda: cost is computed)."""
        ...

    async def aclose(self) -> None: ...
