"""What a tick needs from the outside world, and what it answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from procure.agent.context import DEFAULT_PAYMENT_OVERHEAD
from procure.agent.planner import Planner, Reconsider, heuristic_planner, reconsider
from procure.clouds.base import RentalCloud
from procure.models import (
    Action,
    ObservationType,
)
from procure.payments.settlements import FacilitatorLedger
from procure.store import Store
from procure.store.ledger import SpendCaps
from procure.vendors.client import VendorClient
from procure.vendors.credentials import Keyring

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from procure.agent.cloud_node import NodeClientFactory
    from procure.payments.wallet import Wallet

OBS = ObservationType
EPS = 1e-9  # progress is compared with this tolerance


class RunNotFound(LookupError):
    pass


@dataclass(frozen=True)
class CloudTuning:
    """How the agent rents cloud instances (see `procure.agent.cloud_run`)."""

    boot_timeout_s: float = 900.0
    """A launched instance whose node does not answer in this long is a vendor failure."""
    reserve_ahead_s: float = 120.0
    """Money is reserved this far ahead of a running instance (at least one billing increment
    more is always reserved); when the budget cannot take more, the instance is terminated."""
    spot_hazard: float = 0.5
    """Prior preemptions per hour of an interruptible offer, before anything is learned."""
    boot_s: dict[str, float] = field(
        default_factory=lambda: {"lambda": 300.0, "runpod": 90.0, "vast": 180.0}
    )
    """Prior seconds from launch to a running node, per provider (learned ones replace it)."""
    command: tuple[str, ...] = ("python", "examples/train.py")
    """What the node runs; the job spec goes in its environment (PROCURE_JOB_SPEC)."""
    image: str | None = None
    """Container image for the job on the node (None: the node runs `command` as a process)."""
    checkpoint_dir: str | None = None
    """Where checkpoints go (an fsspec URL every node can reach); None: the node's default."""
    sweep_every_s: float = 30.0
    """How often the worker's sweeper terminates instances no live run owns."""


@dataclass
class AgentDeps:
    """What a tick needs from the outside world."""

    store: Store
    vendors: VendorClient
    account: Wallet | LocalAccount
    """What pays: the agent's `Wallet` (loads eth_account at its first signature), or an
    eth_account account."""
    ledger: FacilitatorLedger
    planner: Planner = heuristic_planner
    cooldown_s: float = 300.0
    auth_window_s: float = 300.0
    """How long a payment's signed authorisation stays valid after the payment is created."""
    auth_margin_s: float = 30.0
    """Clock skew allowed past `validBefore` before an unused authorisation counts as dead."""
    payment_overhead: int = DEFAULT_PAYMENT_OVERHEAD
    """What the planner counts each extra payment as costing, in micro-USD."""
    reconsider: Reconsider | None = reconsider
    """Asked at each renewal of a sliced job whether to stop at the paid checkpoint and move;
    None: always renew."""
    max_troubles: int = 30
    """Ticks in a row without a way forward (see `TROUBLE`) before the job is given up or, with
    no job, the run ends `failed`: every run reaches a terminal state."""
    stall_s: float = 1800.0
    """A running job whose progress has not moved for this long is given up."""
    first_slice_fraction: float = 0.25
    """A vendor not yet proven (`slices.proven`) is first paid for this share of the normal
    first payment; 1: no short first slice."""
    spend_caps: SpendCaps = field(default_factory=SpendCaps)
    """Global caps on spend per hour, day and month, across agent payments and the fleet."""
    clouds: dict[str, RentalCloud] = field(default_factory=dict)
    """The configured cloud accounts' clients, by provider (each with its own key)."""
    cloud: CloudTuning = field(default_factory=CloudTuning)
    keyring: Keyring | None = None
    """Encrypts the per-instance node tokens in the store (None: the vendor client's)."""
    node_client: NodeClientFactory | None = None
    """Opens a cloud instance's job runner (None: `procure.gpu.jobclient` over HTTP)."""


TROUBLE = frozenset(
    {"Vendor error", "Quote rejected", "Payment settled; job state unknown", "State changed"}
)
"""Outcomes that found no way forward; they count towards `AgentDeps.max_troubles`."""
WAITING = ("Waiting", "Payment in doubt", "Payment outcome unknown", "Slice not bought")
"""Outcomes that wait for something bounded (a cooldown, an authorisation's expiry): they
neither count nor reset the count."""


@dataclass(frozen=True)
class TickResult:
    message: str
    action: Action | None = None

    def to_json(self) -> dict[str, object]:
        return {"message": self.message, "action": self.action.to_json() if self.action else None}
