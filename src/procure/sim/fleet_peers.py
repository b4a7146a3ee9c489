"""The fleet benchmark's peers beside the seed's rule: Kubernetes cluster-autoscaler with its
documented defaults, and Navarch's queue-based autoscaler; each proposes, the rails decide."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from procure.clouds.base import InstanceType
from procure.fleet.monitor import InstanceView
from procure.fleet.policies import FleetSignal
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.fleet.settings import FleetSettings
from procure.store.fleet_repo import RUNNING_STATUSES


def _launch(kind: InstanceType, reason: str) -> Proposal:
    region = kind.regions_with_capacity[0] if kind.regions_with_capacity else ""
    return Proposal(PROVISION, None, reason, kind.name, region, kind.price_per_hour)


def _terminate(v: InstanceView, reason: str) -> Proposal:
    i = v.instance
    return Proposal(TERMINATE, v.id, reason, i.instance_type, i.region, i.price_per_hour)


def _busy(v: InstanceView) -> float:
    """GPUs busy on the node, from its utilisation (98 % per busy GPU, as NVML reports)."""
    util = v.latest.gpu_util if v.latest and v.latest.gpu_util is not None else 0.0
    return util / 98.0 * v.instance.gpus


def pack(sizes: Sequence[int], bins: list[int], per: int) -> tuple[int, list[int]]:
    """First-fit of `sizes` (GPUs per job, in order) into `bins` (free GPUs per node there is),
    opening nodes of `per` GPUs for the rest. Returns (nodes opened, sizes that fit no node)."""
    free = list(bins)
    opened = 0
    left = []
    for g in sizes:
        slot = next((k for k, f in enumerate(free) if f >= g), None)
        if slot is not None:
            free[slot] -= g
        elif g <= per:
            free.append(per - g)
            opened += 1
        else:
            left.append(g)
    return opened, left


@dataclass
class ClusterAutoscaler:
    """Kubernetes cluster-autoscaler (FAQ, "What are the parameters to CA?"), its defaults:
    scale up for pods that fit no node, bin-packing them onto new nodes of a node group picked
    by the `random` expander (the default); a node is unneeded when its requested GPUs are
    under `scale-down-utilization-threshold` 0.5 (GPU nodes are judged on GPUs alone) and its
    pods fit elsewhere; it goes after `scale-down-unneeded-time` 10 min, not within
    `scale-down-delay-after-add` 10 min of a scale-up; empty nodes go in bulk
    (`max-empty-bulk-delete` 10), non-empty ones one at a time (their pods are evicted and
    restart elsewhere). Every instance type is a node group."""

    seed: int = 0
    unneeded_s: float = 600.0
    threshold: float = 0.5
    delay_after_add_s: float = 600.0
    _rng: random.Random = field(default_factory=random.Random, repr=False)
    _unneeded: dict[str, datetime] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)

    def __call__(
        self,
        views: Sequence[InstanceView],
        cfg: FleetSettings,
        price: int | None,
        signal: FleetSignal,
    ) -> list[Proposal]:
        running = [v for v in views if v.instance.status in RUNNING_STATUSES]
        booting = [v.instance.gpus for v in running if v.instance.status == "booting"]
        pending = [g for g, _ in signal.queued]
        # Pods wait for nodes on their way first (CA counts upcoming nodes).
        _, pending = pack(pending, booting, 0)
        out: list[Proposal] = []
        groups = [t for t in signal.offers if t.regions_with_capacity]
        while pending:
            fits = [t for t in groups if t.gpus >= pending[0]]
            if not fits:
                # No group helps this pod (CA reports it as not triggering a scale-up); it
                # does not hold back the pods behind it that another group fits.
                pending = pending[1:]
                continue
            kind = self._rng.choice(fits)
            n, rest = pack(pending, [], kind.gpus)
            out += [_launch(kind, f"{len(pending)} pod(s) unschedulable") for _ in range(n)]
            pending = rest
            groups = [t for t in groups if t is not kind]
        if out:
            return out
        free = dict(signal.free_gpus)
        active = [v for v in running if v.instance.status == "active"]
        for v in active:
            used = _busy(v)
            others = max((f for i, f in free.items() if i != v.id), default=0)
            if used / v.instance.gpus < self.threshold and (used < 0.5 or used <= others):
                self._unneeded.setdefault(v.id, signal.now)
            else:
                self._unneeded.pop(v.id, None)
        # The delay after a scale-up holds back deletions only: CA goes on tracking unneeded
        # nodes through it (UpdateClusterState runs before isScaleDownInCooldown), so a node
        # idle for 10 min by the delay's end goes then.
        if signal.last_provision_at and signal.now - signal.last_provision_at < timedelta(
            seconds=self.delay_after_add_s
        ):
            return []
        due = [
            v
            for v in active
            if v.id in self._unneeded
            and (signal.now - self._unneeded[v.id]).total_seconds() >= self.unneeded_s
        ]
        empty = [v for v in due if _busy(v) < 0.5][:10]
        if empty:
            return [_terminate(v, "empty for 10 min") for v in empty]
        if due:
            v = min(due, key=_busy)
            self._unneeded.pop(v.id, None)
            return [_terminate(v, "under 50 % requested for 10 min")]
        return []


def navarch_queue(
    views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, signal: FleetSignal
) -> list[Proposal]:
    """Navarch's queue-based autoscaler: as many nodes as the work queued and running needs
    (GPUs asked over GPUs per node), within min and max; down, an idle node goes (its cfg:
    the configured node type, cooldown 5 min: the rails enforce it)."""
    running = [v for v in views if v.instance.status in RUNNING_STATUSES]
    per = max(1, signal.gpus_per_instance)
    want = math.ceil((signal.queued_gpus + signal.busy_gpus) / per)
    want = max(cfg.min_instances, min(cfg.max_instances, want))
    kind = next((t for t in signal.offers if t.name == cfg.default_instance_type), None)
    if want > len(running) and kind is not None and price is not None:
        return [_launch(kind, f"queue wants {want} node(s)") for _ in range(want - len(running))]
    if want < len(running):
        idle = [v for v in running if v.instance.status == "active" and _busy(v) < 0.5]
        return [_terminate(v, f"queue wants {want} node(s)") for v in idle[: len(running) - want]]
    return []


def navarch_reactive(
    views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, signal: FleetSignal
) -> list[Proposal]:
    """Navarch's reactive autoscaler as documented: the mean utilisation of the nodes that report
    metrics above 80 % adds a node, below 20 % removes the idlest, never under the minimum. Only
    its cooldown (5 min: the rails) spaces its actions; it does not wait for a node still
    booting (procure's `policies.navarch`, the rule it ships, does)."""
    running = [v for v in views if v.instance.status in RUNNING_STATUSES]
    active = [v for v in running if v.instance.status == "active" and v.latest is not None]
    kind = next((t for t in signal.offers if t.name == cfg.default_instance_type), None)
    if kind is not None and price is not None and len(running) < cfg.min_instances:
        return [_launch(kind, "below the minimum")]
    if not active:
        return []
    mean = sum(v.latest.gpu_util or 0 for v in active if v.latest) / len(active)
    if kind is not None and price is not None and mean > cfg.high_gpu_threshold:
        return [_launch(kind, f"pool at {mean:.0f}% GPU")]
    if mean < cfg.low_gpu_threshold and len(running) > cfg.min_instances:
        return [_terminate(min(active, key=_busy), f"pool at {mean:.0f}% GPU")]
    return []
