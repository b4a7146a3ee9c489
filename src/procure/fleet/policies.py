"""Scaling policies beside the seed's rule (which `policy.decide` keeps, unchanged): a static fleet,
a cluster-autoscaler-like rule, a Navarch-like rule, and procure's own, which reads the job
queue, predicts demand (Little's law), knows the boot time and per-second prices, and launches
where there is capacity. Each only proposes; the rails decide, whatever a policy says."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from procure.fleet import policy
from procure.fleet.monitor import InstanceView
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.fleet.settings import FleetSettings
from procure.store.fleet_repo import RUNNING_STATUSES


@dataclass(frozen=True)
class FleetSignal:
    """What a policy may know beyond the nodes' figures: the job scheduler's queue and
    counters, and the cloud's catalogue. Nothing about jobs that have not arrived."""

    now: datetime
    queued_jobs: int = 0
    queued_gpus: int = 0
    oldest_wait_s: float = 0.0
    arrived: int = 0  # jobs submitted so far (a counter)
    busy_gpus: int = 0
    gpus_per_instance: int = 1
    boot_s: float = 180.0  # as observed on this cloud
    regions: tuple[str, ...] = ()  # regions with capacity for the default type now
    last_provision_at: datetime | None = None


Policy = Callable[[Sequence[InstanceView], FleetSettings, int | None, FleetSignal], list[Proposal]]


def _running(views: Sequence[InstanceView]) -> list[InstanceView]:
    return [v for v in views if v.instance.status in RUNNING_STATUSES]


def _launch(cfg: FleetSettings, price: int, reason: str, region: str | None = None) -> Proposal:
    return Proposal(PROVISION, None, reason, cfg.default_instance_type, region or cfg.region, price)


def _terminate(v: InstanceView, reason: str) -> Proposal:
    i = v.instance
    return Proposal(TERMINATE, v.id, reason, i.instance_type, i.region, i.price_per_hour)


def seed_rule(
    views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, _signal: FleetSignal
) -> list[Proposal]:
    """The seed's rule itself (`policy.decide`)."""
    return policy.decide(views, cfg, price)


def static(size: int) -> Policy:
    """A fixed fleet of `size` instances: launch up to it, never terminate."""

    def decide(
        views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, signal: FleetSignal
    ) -> list[Proposal]:
        missing = size - len(_running(views))
        if price is None or missing <= 0:
            return []
        regions = signal.regions or (cfg.region,)
        return [
            _launch(cfg, price, f"static fleet of {size}", regions[n % len(regions)])
            for n in range(missing)
        ]

    return decide


def cluster_autoscaler(
    views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, signal: FleetSignal
) -> list[Proposal]:
    """Like Kubernetes' cluster-autoscaler: enough nodes for the pending work at once (it
    reads placements, not usage); a node under 50 % for 10 minutes goes, but not within 10
    minutes of a scale-up. Its cfg: low threshold 50, low duration 10 min."""
    running = _running(views)
    booting = sum(v.instance.gpus for v in running if v.instance.status == "booting")
    active_gpus = sum(v.instance.gpus for v in running if v.instance.status == "active")
    free = max(0, active_gpus - signal.busy_gpus)
    deficit = signal.queued_gpus - free - booting
    if price is not None and deficit > 0:
        n = math.ceil(deficit / signal.gpus_per_instance)
        return [_launch(cfg, price, f"{signal.queued_jobs} job(s) pending") for _ in range(n)]
    recent_up = signal.last_provision_at is not None and signal.now - (
        signal.last_provision_at
    ) < timedelta(minutes=10)
    if recent_up or signal.queued_jobs:
        return []
    keep = len(running)
    out = []
    for v in sorted(running, key=lambda x: -x.low_streak_min):
        if v.instance.status != "active" or v.low_streak_min < cfg.low_usage_duration_mins:
            continue
        if keep <= cfg.min_instances:
            break
        keep -= 1
        out.append(_terminate(v, f"unneeded for {v.low_streak_min:.0f} min"))
    return out


def navarch(
    views: Sequence[InstanceView], cfg: FleetSettings, price: int | None, _signal: FleetSignal
) -> list[Proposal]:
    """Like Navarch's reactive autoscaler: the pool's mean utilisation above 80 % adds a node,
    below 20 % removes the idlest (its cfg: cooldown 5 min, the rails enforce it)."""
    running = _running(views)
    active = [v for v in running if v.instance.status == "active" and v.latest is not None]
    if price is not None and len(running) < cfg.min_instances:
        return [_launch(cfg, price, "below the minimum")]
    if not active:
        return []
    mean = sum(v.latest.gpu_util or 0 for v in active if v.latest) / len(active)
    if price is not None and mean > cfg.high_gpu_threshold and len(active) == len(running):
        return [_launch(cfg, price, f"pool at {mean:.0f}% GPU")]
    if mean < cfg.low_gpu_threshold and len(running) > cfg.min_instances:
        idlest = min(active, key=lambda v: (v.latest.gpu_util or 0) if v.latest else 0)
        return [_terminate(idlest, f"pool at {mean:.0f}% GPU")]
    return []


@dataclass
class ProcurePolicy:
    """procure's policy. Scale up for the queue that capacity on its way will not absorb,
    at once and where the cloud has capacity; keep warm what the predicted demand needs
    (Little's law: arrival rate times mean GPU time, plus √ of it as Poisson headroom); let an
    idle instance go once it has been idle as long as a new one takes to boot (per-second
    billing: keeping it longer costs more than booting another would, ski-rental)."""

    half_life_min: float = 30.0  # how fast the demand estimate forgets
    headroom: float = 0.0  # standard deviations of Poisson demand kept warm
    _rate: float = 0.0  # arrivals per second (EWMA)
    _busy: float = 0.0  # busy GPUs (EWMA): rate times mean GPU time, by Little's law
    _last: tuple[datetime, int] | None = field(default=None, repr=False)

    def predicted_gpus(self) -> float:
        return self._busy

    def _learn(self, signal: FleetSignal) -> None:
        if self._last is not None:
            dt = (signal.now - self._last[0]).total_seconds()
            if dt > 0:
                keep = 0.5 ** (dt / 60 / self.half_life_min)
                rate = (signal.arrived - self._last[1]) / dt
                self._rate = keep * self._rate + (1 - keep) * rate
                demand = signal.busy_gpus + signal.queued_gpus
                self._busy = keep * self._busy + (1 - keep) * demand
        self._last = (signal.now, signal.arrived)

    def __call__(
        self,
        views: Sequence[InstanceView],
        cfg: FleetSettings,
        price: int | None,
        signal: FleetSignal,
    ) -> list[Proposal]:
        self._learn(signal)
        running = _running(views)
        per = max(1, signal.gpus_per_instance)
        booting = sum(v.instance.gpus for v in running if v.instance.status == "booting")
        active_gpus = sum(v.instance.gpus for v in running if v.instance.status == "active")
        free = max(0, active_gpus - signal.busy_gpus)
        deficit = signal.queued_gpus - free - booting
        warm = self._busy + self.headroom * math.sqrt(self._busy)
        floor = max(cfg.min_instances, math.ceil(warm / per - 1e-9) if self._busy > 0 else 0)
        proposals: list[Proposal] = []
        if price is not None and (deficit > 0 or len(running) < cfg.min_instances):
            n = max(math.ceil(max(deficit, 0) / per), cfg.min_instances - len(running))
            n = min(n, cfg.max_instances - len(running))  # the rails would refuse the rest
            regions = signal.regions or (cfg.region,)
            for k in range(n):
                reason = f"{signal.queued_jobs} job(s) queued, {booting} GPU(s) on the way"
                proposals.append(_launch(cfg, price, reason, regions[k % len(regions)]))
            return proposals
        if signal.queued_jobs:
            return proposals  # work is waiting: nothing idle goes now
        grace_min = max(1.0, signal.boot_s / 60)
        keep = len(running)
        for v in sorted(running, key=lambda x: -x.low_streak_min):
            if keep <= floor:
                break
            if v.instance.status == "active" and v.low_streak_min >= grace_min:
                keep -= 1
                proposals.append(
                    _terminate(
                        v,
                        f"idle {v.low_streak_min:.0f} min (boot takes {grace_min:.0f}); "
                        f"predicted demand {self._busy:.1f} GPU(s)",
                    )
                )
        return proposals
