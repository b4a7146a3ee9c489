"""What procure's fleet policy knows of the provider's billing: when each instance's billing
began, so when its paid increment ends, which boots no queued job needs any more (or only one
a smaller type holds), and which idle instances a late job would renew for little."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from procure.clouds.base import InstanceType
from procure.fleet.monitor import InstanceView

if TYPE_CHECKING:
    from procure.fleet.policies import FleetSignal

# Increments this long make a booted instance that nothing needs cost more than a new boot's
# wait is worth: a boot nobody needs any more is called off (per-second or -minute: let be).
LONG_INCREMENT_S = 600.0


@dataclass
class BillingClock:
    """When each instance's billing began: at launch where the cloud bills the boot, else when
    it became active, which happened after the last scan that saw it booting (that scan is the
    anchor: its increments end no later than the real ones, so a release timed on them is never
    billed a new one). Never seen booting: its launch, as early."""

    booting_seen: dict[str, datetime] = field(default_factory=dict)
    billed_from: dict[str, datetime] = field(default_factory=dict)

    def track(self, running: Sequence[InstanceView], signal: FleetSignal) -> None:
        live = {v.id for v in running}
        for v in running:
            if v.instance.status == "booting":
                self.booting_seen[v.id] = signal.now
            elif v.id in self.booting_seen:
                seen = self.booting_seen.pop(v.id)
                start = v.instance.first_seen_at
                self.billed_from[v.id] = start if signal.bills_boot else seen
        for gone in (set(self.booting_seen) | set(self.billed_from)) - live:
            self.booting_seen.pop(gone, None)
            self.billed_from.pop(gone, None)

    def paid_left_s(self, v: InstanceView, signal: FleetSignal) -> float:
        """Seconds left of the increment the instance is being billed for (0: per second)."""
        increment = max(1.0, signal.billing_increment_s)
        if increment <= 1:
            return 0.0
        start = self.billed_from.get(v.id, v.instance.first_seen_at)
        age = max(0.0, (signal.now - start).total_seconds())
        return increment - age % increment


def _first_fit(rooms: Sequence[int], queued: Sequence[tuple[int, float]]) -> list[int | None]:
    """Where each queued job goes among `rooms` (free GPUs), the first that holds it, in the
    queue's order, as the launches count on; None where none does."""
    left = list(rooms)
    slots: list[int | None] = []
    for gpus, _ in queued:
        slot = next((k for k, f in enumerate(left) if f >= gpus), None)
        if slot is not None:
            left[slot] -= gpus
        slots.append(slot)
    return slots


def unneeded_boots(
    running: Sequence[InstanceView],
    signal: FleetSignal,
    step_s: float,
    offers: Sequence[InstanceType] = (),
    patience_s: float = float("inf"),
) -> list[tuple[InstanceView, int]]:
    """Where billing starts once booted and comes in long increments, the booting instances
    that no queued job needs any more (a place freed elsewhere took the job each was launched
    for), at the last scan before their boot ends, each with the GPUs queued jobs would take on
    it: each would be billed a whole increment for nothing, and booting is free. So is one whose
    queued takers fill at most half of its GPUs where a smaller type of `offers` with capacity
    holds the largest of them (an 8-GPU node whose 8-GPU job went elsewhere, taken by a 1-GPU
    job, would bill 8 GPUs for a whole increment), and none of them has waited longer than
    `patience_s`: those jobs get a launch of their own size at the next scan, a boot later.
    None is called off where its jobs would then take the room of a job that another boot
    holds and that has waited longer (a scheduler may list a new small job before an old big
    one): that job, due already, would lose its boot and wait another, past its target."""
    if signal.bills_boot or signal.billing_increment_s < LONG_INCREMENT_S:
        return []
    booting = [v for v in running if v.instance.status == "booting"]
    rooms = [v.instance.gpus for v in booting]
    placed = _first_fit(rooms, signal.queued)
    taken = [0] * len(booting)
    largest = [0] * len(booting)
    waited = [0.0] * len(booting)
    for slot, (gpus, wait) in zip(placed, signal.queued, strict=True):
        if slot is not None:
            taken[slot] += gpus
            largest[slot] = max(largest[slot], gpus)
            waited[slot] = max(waited[slot], wait)

    def unneeded(k: int, v: InstanceView) -> bool:
        n = v.instance.gpus
        if taken[k] == 0:
            return True
        smaller = any(largest[k] <= t.gpus < n and t.regions_with_capacity for t in offers)
        return 2 * taken[k] <= n and smaller and waited[k] <= patience_s

    def displaces(off: set[int]) -> bool:
        """Would a job placed on a boot kept, which has waited longer than `patience_s`, have
        no place once the boots `off` are gone? (One that has waited less gets a launch of its
        own in time.)"""
        fit = _first_fit([-1 if k in off else r for k, r in enumerate(rooms)], signal.queued)
        return any(
            p is not None and p not in off and f is None and wait > patience_s
            for p, f, (_, wait) in zip(placed, fit, signal.queued, strict=True)
        )

    out: list[tuple[InstanceView, int]] = []
    off: set[int] = set()  # each prefix of `out` is checked: the caller may stop at any one
    for k, v in enumerate(booting):
        if not unneeded(k, v):
            continue
        if (signal.now - v.instance.first_seen_at).total_seconds() < signal.boot_s - step_s:
            continue
        if displaces(off | {k}):
            continue
        off.add(k)
        out.append((v, taken[k]))
    return out


def renews_for_little(v: InstanceView, signal: FleetSignal, paid_left_s: float) -> bool:
    """Billed by long increments, an idle instance with more GPUs than the jobs ask for on
    average, in the last quarter of its increment, with no queued job that needs its size: a job
    the scheduler lands on it now likely runs past the increment's end and renews every GPU for a
    whole increment, mostly idle. It goes now: the rest of the increment is paid anyway, and
    a job that needs its size is launched for as any other (the same increment, a boot later)."""
    increment = signal.billing_increment_s
    if increment < LONG_INCREMENT_S or signal.arrived <= 0 or paid_left_s > increment / 4:
        return False
    gpus = v.instance.gpus
    mean_job = signal.arrived_gpus / signal.arrived
    return gpus > mean_job and signal.largest_queued_gpus < gpus
