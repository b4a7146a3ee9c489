"""What the controller works with: the store, the cloud, the nodes' HTTP client, its settings,
the global caps, its clock (injectable: tests and the demo run time faster) and its identity."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx

from procure.clouds.base import Cloud, Instance, InstanceType
from procure.fleet.settings import FleetSettings
from procure.models import utcnow
from procure.store import Store
from procure.store.ledger import SpendCaps


def default_owner() -> str:
    return f"fleet-{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class FleetContext:
    store: Store
    cloud: Cloud
    nodes: httpx.AsyncClient  # bounded (httpbounds.bounded_client)
    cfg: FleetSettings
    caps: SpendCaps = field(default_factory=SpendCaps)
    clock: Callable[[], datetime] = utcnow
    dry_run: bool = True
    owner: str = field(default_factory=default_owner)
    slack: bool = False  # a webhook is configured: queue Slack messages
    mapped_ports: bool = False  # nodes answer where the cloud maps their port (RunPod, Vast.ai)
    # Learnt while running (not state: the store is the truth).
    types: dict[str, InstanceType] = field(default_factory=dict)
    types_at: datetime | None = None  # when `types` was read (on the controller's clock)
    # Per instance id: its status and since when (fleet.stuck: launches that never work).
    status_since: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    cloud_failures: int = 0
    nodes_answered: bool = False  # some node of the fleet has answered (fleet.controller)
    samples_read: bool = False  # the store's samples were asked that once
    backoff_until: datetime | None = None
    # The nodes whose dead-man lease the last node read renewed (by instance id): kept up while
    # the cloud's listing fails (fleet.node_leases).
    leased: dict[str, Instance] = field(default_factory=dict)

    @property
    def lease_name(self) -> str:
        return f"fleet:{self.cfg.fleet_name}"

    @property
    def node_holder(self) -> str:
        """The dead-man lease holder: the fleet, not this process, so a restarted controller
        renews the same lease."""
        return f"procure-{self.lease_name}"

    @property
    def node_token(self) -> str | None:
        return self.cfg.node_token.get_secret_value() if self.cfg.node_token else None
