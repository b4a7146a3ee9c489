"""Right-sizing for procure's fleet policy: a long job left alone on a big node moves to the
cheapest type that holds it or, billed by long increments, onto another node in use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from procure.clouds.base import InstanceType
from procure.fleet.billing import LONG_INCREMENT_S
from procure.fleet.monitor import InstanceView
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.fleet.settings import FleetSettings

if TYPE_CHECKING:
    from procure.fleet.policies import FleetSignal


def launch(
    cfg: FleetSettings,
    price: int,
    reason: str,
    region: str | None = None,
    instance_type: str | None = None,
) -> Proposal:
    kind = instance_type or cfg.default_instance_type
    return Proposal(PROVISION, None, reason, kind, region or cfg.region, price)


def terminate(v: InstanceView, reason: str) -> Proposal:
    i = v.instance
    return Proposal(TERMINATE, v.id, reason, i.instance_type, i.region, i.price_per_hour)


def idle(v: InstanceView, cfg: FleetSettings) -> bool:
    """Active and running nothing now: below the low threshold, and below half of one GPU's
    share (a node of 8 with one busy GPU is not idle)."""
    last = v.latest
    if v.instance.status != "active" or last is None or last.gpu_util is None:
        return False
    return last.gpu_util < min(cfg.low_gpu_threshold, 50.0 / max(1, v.instance.gpus))


def right_size(
    running: Sequence[InstanceView],
    cfg: FleetSettings,
    signal: FleetSignal,
    *,
    offers: Sequence[InstanceType],
    launching: int,
    left: int,
    frag_since: dict[str, datetime],
    replacing: dict[str, datetime],
    migrate_after_s: float,
    paid_left: Callable[[InstanceView], float],
) -> list[Proposal]:
    """A node at most half used for `migrate_after_s` (a long job left alone on a big node:
    durations are heavy-tailed, one that has run long will likely run longer) is replaced by
    the cheapest of `offers` (types it may launch, with capacity) that holds its work: the new
    one is launched, and once booted the old one goes near the end of its paid increment; its
    jobs restart there from their last checkpoint. Billed by long increments, where another node
    in use has the room, the jobs move there at the end of the increment and nothing is
    launched. `frag_since` (when each node was first seen half used) and `replacing` (when its
    replacement was launched) are the caller's state, kept across scans; `left` counts the
    instances left after this scan's other terminations (none goes below the minimum). Only on
    the scheduler's exact placement (`placement_known`): a utilisation estimate may hide a job."""
    out: list[Proposal] = []
    placed = dict(signal.free_gpus)
    free = dict(placed)
    step = 1.5 * cfg.scan_interval_s
    room = cfg.max_instances - len(running) - launching
    seen = set()
    long = signal.billing_increment_s >= LONG_INCREMENT_S
    # Where a moved job may go without a launch, fullest first (as the scheduler places): a node
    # in use (an idle one goes at the end of its own increment).
    homes = [
        v.id
        for v in sorted(running, key=lambda x: free.get(x.id, 0))
        if v.instance.status == "active" and free.get(v.id, 0) and not idle(v, cfg)
    ]
    leaving: set[str] = set()  # moved out this scan: no home
    taking: set[str] = set()  # a home this scan: it stays
    for v in running:
        n = v.instance.gpus
        # Its jobs now, as placed at the start of the scan (not counting those moving in).
        busy = n - placed[v.id] if v.id in placed else 0  # not placed: nothing to move
        smaller = [t for t in offers if busy <= t.gpus < n]
        if v.instance.status != "active" or busy == 0 or 2 * busy > n or not smaller:
            continue
        seen.add(v.id)
        since = frag_since.setdefault(v.id, signal.now)
        if (signal.now - since).total_seconds() < migrate_after_s:
            continue
        left_s = paid_left(v)
        started = replacing.get(v.id)
        elsewhere = max((f for i, f in free.items() if i != v.id), default=0)
        home = next(
            (i for i in homes if i not in leaving | {v.id} and free.get(i, 0) >= busy), None
        )
        if v.id in taking:
            continue  # it takes another's jobs: fuller now
        if long and started is None and home is not None:
            # Another node in use, billed anyway, holds its work: nothing to launch.
            if left_s <= step and left > cfg.min_instances:
                left -= 1
                free[home] -= busy
                leaving.add(v.id)
                taking.add(home)
                frag_since.pop(v.id, None)
                out.append(terminate(v, f"{busy} of {n} GPUs used: its jobs fit elsewhere"))
            continue
        if started is not None and elsewhere >= busy and left_s <= step:
            if (signal.now - started).total_seconds() >= signal.boot_s and (
                left > cfg.min_instances
            ):
                left -= 1
                replacing.pop(v.id, None)
                frag_since.pop(v.id, None)
                out.append(terminate(v, f"{busy} of {n} GPUs used: moved to a smaller type"))
            continue
        stale = started is not None and (
            (signal.now - started).total_seconds() > 2 * signal.boot_s + step
        )
        # Billed by long increments, a replacement that could not boot before the old node's
        # increment ends would find it renewed: both paid a whole increment. It is launched at
        # the last scans that leave it a boot (and a scan) before that end, or in the next one.
        latest = signal.boot_s + step + (step if long else 0.0)
        soonest = signal.boot_s + step if long else 0.0
        if (started is None or stale) and soonest <= left_s <= latest and room > 0:
            kind = min(smaller, key=lambda t: (t.price_per_hour, t.gpus, t.name))
            replacing[v.id] = signal.now
            room -= 1
            out.append(
                launch(
                    cfg,
                    kind.price_per_hour,
                    f"{busy} of {n} GPUs used for {migrate_after_s / 60:.0f} min: "
                    f"{kind.name} replaces it",
                    kind.regions_with_capacity[0],
                    kind.name,
                )
            )
    for gone in set(frag_since) - seen:
        frag_since.pop(gone, None)
        replacing.pop(gone, None)
    return out
