"""The gateway's configuration (what `procure gateway` is started with) and the cloud client it
sells from, built from that provider's own settings (its key from the environment)."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from procure.clouds.base import LABEL_PREFIX, PROVIDERS, Provider, RentalCloud
from procure.keyfiles import create_once


@dataclass
class GatewayConfig:
    vendor_id: str
    secret: str = field(repr=False)  # the bearer buyers send (GPU_VENDOR_SECRET), as the mock's
    provider: Provider
    pay_to: str  # the gateway's own address: every payment settles to it
    network: str
    asset: str
    asset_extra: dict[str, Any]
    node_key: str = field(repr=False)  # derives each instance's node token (never sent anywhere)
    margin: float = 0.1
    max_instances: int = 2  # live jobs (so instances) one buyer (payer address) may hold
    gpus: tuple[str, ...] = ()  # the GPU models sold (empty: whatever the cloud offers)
    quote_valid_s: float = 300.0
    max_hours: float = 24.0  # one quote or renewal at most
    # The shortest sale, in seconds: a cloud that bills the boot (RunPod, Vast.ai) is paid for
    # it from the margin, so a sale shorter than boot / margin loses money (`procure gateway`:
    # 10 minutes).
    min_sale_s: float = 0.0
    hour_s: float = 3600.0  # wall seconds in a paid hour (tests and demos shrink it)
    command: tuple[str, ...] = ("python", "examples/train.py")  # what the node runs
    image: str | None = None  # container image of a launch (RunPod, Vast.ai)
    checkpoint_dir: str = "~/.cache/procure/gateway-checkpoints"  # fsspec URL nodes can reach
    node_port: int = 9876
    poll_s: float = 2.0
    boot_timeout_s: float = 900.0
    # How long a job waits, once every region's launch was refused (clouds list capacity they
    # will not give), before it asks them all again: asked every poll, each try was a launch
    # call on the account and a failed instance row, ~1,350 an hour per job on three regions.
    launch_retry_s: float = 60.0
    sweep_every_s: float = 30.0
    # The store's gateway lease (`storelease`), renewed every third of it: how long a gateway
    # killed without stopping keeps another gateway off its store (once its book is done).
    store_lease_s: float = 60.0
    log_lines: int = 200  # a job's last log lines kept and relayed
    max_params_bytes: int = 8_000
    max_open_quotes: int = 10_000  # unexpired quotes at once (a hostile buyer's spam)
    max_live_jobs: int = 1_000  # all buyers together, paid or being paid
    # The operator's exposure on the cloud account, over all buyers (however many addresses one
    # buyer uses): what the gateway's instances may cost per hour together (a sold job counted
    # at its sale price, the most any launch of it may cost), and how many it may hold, sold
    # jobs not yet launched, launches in flight and instances still being ended included
    # (`book.committed`). A sale that would pass either is refused before any money moves;
    # renewals add no instance and stay allowed. 0 sells nothing new (a pause); there is no
    # "unbounded": set a bigger number.
    max_hourly_usd: float = 50.0
    max_total_instances: int = 8
    name: str = "procure gateway"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A cap left out, null or garbled in a config file must never read as "no cap".
        usd = self.max_hourly_usd
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd):
            raise ValueError(f"max_hourly_usd must be a finite number of dollars, not {usd!r}")
        if usd < 0:
            raise ValueError(f"max_hourly_usd must be 0 (no new sales) or more, not {usd!r}")
        count = self.max_total_instances
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"max_total_instances must be a whole number, 0 (no new sales) or more, "
                f"not {count!r}"
            )

    @property
    def label(self) -> str:
        """The prefix of every instance name this gateway launches (one gateway per vendor id
        on an account never sweeps another's instances)."""
        tag = hashlib.sha256(self.vendor_id.encode()).hexdigest()[:8]
        return f"{LABEL_PREFIX}gw-{tag}-"

    def instance_name(self, key: str, attempt: int) -> str:
        digest = hashlib.sha256(f"{self.vendor_id}\x00{key}".encode()).hexdigest()[:24]
        return f"{self.label}{digest}-{attempt}"

    def node_token(self, instance_name: str) -> str:
        return hmac.new(self.node_key.encode(), instance_name.encode(), "sha256").hexdigest()


def load_node_key(home: Path) -> str:
    """The key node tokens derive from: created once under `home` (mode 0600) and kept, so a
    restarted gateway still reaches the nodes it launched."""
    path = home / "gateway-node.key"
    if path.exists():
        return path.read_text().strip()
    return create_once(path, secrets.token_hex(32).encode()).decode().strip()


def cloud_from_env(provider: str) -> RentalCloud:
    """The provider's client, configured by its own settings (LAMBDA_API_KEY, RUNPOD_API_KEY,
    VAST_API_KEY and their base URLs); each key goes only to its own provider."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown cloud {provider!r}: one of {', '.join(PROVIDERS)}")
    if provider == "runpod":
        from procure.clouds.runpod.client import RunPodCloud

        return RunPodCloud()  # type: ignore[return-value]
    if provider == "lambda":
        from procure.clouds.lambda_cloud.client import LambdaCloud

        return LambdaCloud()  # type: ignore[return-value]
    from procure.clouds.vast.client import VastCloud

    return VastCloud()  # type: ignore[return-value]
