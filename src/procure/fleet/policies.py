"""Scaling policies beside the seed's rule (which `policy.decide` keeps, unchanged): a static fleet,
a cluster-autoscaler-like rule, a Navarch-like rule, and procure's own, which reads the job
queue, learns the arrival rate and a job's GPU time (Little's law), launches only when the
queue's last job would wait past its target (boot time and per-second billing counted), lets an
idle instance go at once unless work is predicted within a boot, and launches the type with the
configured GPU that holds the jobs, where there is capacity. Each only proposes; the rails
decide, whatever a policy says."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from procure.clouds.base import InstanceType
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
    completed: int = 0  # jobs finished so far (a counter)
    busy_gpus: int = 0
    gpus_per_instance: int = 1
    boot_s: float = 180.0  # as observed on this cloud
    regions: tuple[str, ...] = ()  # regions with capacity for the default type now
    last_provision_at: datetime | None = None
    largest_queued_gpus: int = 0  # GPUs the largest queued job asks for
    offers: tuple[InstanceType, ...] = ()  # the cloud's catalogue: types, prices, capacity


Policy = Callable[[Sequence[InstanceView], FleetSettings, int | None, FleetSignal], list[Proposal]]


def _running(views: Sequence[InstanceView]) -> list[InstanceView]:
    return [v for v in views if v.instance.status in RUNNING_STATUSES]


def _launch(
    cfg: FleetSettings,
    price: int,
    reason: str,
    region: str | None = None,
    instance_type: str | None = None,
) -> Proposal:
    kind = instance_type or cfg.default_instance_type
    return Proposal(PROVISION, None, reason, kind, region or cfg.region, price)


_GPU = re.compile(r"^\s*\d+\s*x\s+(.+?)\s*\(\s*(\d+)\s*GB", re.IGNORECASE)


def same_gpu(a: InstanceType, b: InstanceType) -> bool:
    """Do both types carry the same GPU (model and memory, as Lambda's descriptions name them:
    "1x A100 (40 GB PCIe)" and "8x A100 (40 GB SXM4)" do; an A10 or an 80 GB A100 does not)?"""
    if a.name == b.name:
        return True
    ma, mb = _GPU.match(a.description), _GPU.match(b.description)
    return bool(ma and mb and (ma[1].casefold(), ma[2]) == (mb[1].casefold(), mb[2]))


def fitting_type(signal: FleetSignal, cfg: FleetSettings) -> InstanceType | None:
    """The type to launch for the queue: the configured one while its GPUs hold the largest
    job queued; else the cheapest with the same GPU, enough of them, and capacity now (the
    configured one when none has). The jobs state how many GPUs they need, not which GPUs they
    run on: that is the configured type's. None: the catalogue does not list the type."""
    default = next((t for t in signal.offers if t.name == cfg.default_instance_type), None)
    need = signal.largest_queued_gpus
    if default is None or need <= default.gpus:
        return default
    fits = [
        t
        for t in signal.offers
        if t.gpus >= need and t.regions_with_capacity and same_gpu(t, default)
    ]
    return min(fits, key=lambda t: (t.price_per_hour, t.gpus, t.name), default=default)


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
    """procure's policy: as few GPU-seconds billed beyond the work as a queue-wait target allows.

    It reads the job queue and learns two figures: the arrival rate and the GPU time a job
    takes (Little's law on what it sees: busy GPU-seconds over jobs completed), both forgetting
    with `half_life_min`. From them it predicts when the last job queued would start on the
    capacity there is (active and booting), and how the queue grows.

    - Up: only when the last job queued would wait longer than `target_wait_s` (and longer than
      a boot: a launch is billed from its first second and helps only once booted); then, at
      once and where the cloud has capacity, as many instances as bring that wait within the
      target, never more than the queue can use.
    - Down: billing is per second, so an idle instance is worth keeping only for work on its
      way: with no job queued, an idle instance goes at once, unless the arrivals predicted
      within a boot time would make the fleet left launch again (ski rental: keeping it that
      long costs what booting another would).
    """

    target_wait_s: float = 3600.0  # how long the last job queued may wait before a launch
    half_life_min: float = 60.0  # how fast the learned figures forget
    _rate: float = 0.0  # jobs arriving per second (EWMA)
    _busy_s: float = 0.0  # busy GPU-seconds seen (decayed)
    _done: float = 0.0  # jobs completed (decayed)
    _last: tuple[datetime, int, int] | None = field(default=None, repr=False)

    def job_gpu_s(self) -> float | None:
        """GPU-seconds a job takes, as seen so far (None before a first job completed)."""
        return self._busy_s / self._done if self._done >= 1 else None

    def predicted_gpus(self) -> float:
        """The load coming: GPUs busy on average at the arrival rate seen (Little's law)."""
        gpu_s = self.job_gpu_s()
        return 0.0 if gpu_s is None else self._rate * gpu_s

    def _learn(self, signal: FleetSignal) -> None:
        if self._last is not None:
            at, arrived, completed = self._last
            dt = (signal.now - at).total_seconds()
            if dt > 0:
                keep = 0.5 ** (dt / 60 / self.half_life_min)
                self._rate = keep * self._rate + (1 - keep) * (signal.arrived - arrived) / dt
                self._busy_s = keep * self._busy_s + signal.busy_gpus * dt
                self._done = keep * self._done + max(0, signal.completed - completed)
        self._last = (signal.now, signal.arrived, signal.completed)

    def _limit(self, signal: FleetSignal) -> float:
        return max(self.target_wait_s, signal.boot_s)

    def tail_wait_s(self, backlog: float, capacity: int) -> float:
        """When the last of `backlog` jobs waiting for a GPU to free up would start on
        `capacity` GPUs: each frees one job per job-time, on average."""
        gpu_s = self.job_gpu_s()
        if backlog <= 0:
            return 0.0
        if gpu_s is None or capacity <= 0:
            return math.inf
        return backlog * gpu_s / capacity

    def _launches(
        self, signal: FleetSignal, per: int, capacity: int, free: int, booting: int
    ) -> int:
        """Instances of `per` GPUs to launch now for the queue."""
        deficit = signal.queued_gpus - free - booting  # queued GPUs no GPU there is will take
        backlog = max(0, signal.queued_gpus - free)  # jobs waiting for a GPU to free up
        if deficit <= 0 or self.tail_wait_s(backlog, capacity) <= self._limit(signal):
            return 0
        gpu_s = self.job_gpu_s()
        if gpu_s is None or capacity <= 0:
            return math.ceil(deficit / per)  # nothing learned yet: a GPU per job queued
        needed = backlog * gpu_s / self._limit(signal)  # GPUs that start the last in time
        want = math.ceil((needed - capacity) / per - 1e-9)
        return max(1, min(want, math.ceil(deficit / per)))

    def work_coming(self, signal: FleetSignal, capacity: int) -> bool:
        """Would the arrivals predicted within a boot time make `capacity` GPUs launch again?
        Less than one job predicted to wait is none: a fraction of a job launches nothing (at
        night, 0.4 jobs/h predict 0.02 jobs within a boot, which would start on no GPU at all,
        but keeping the last GPU billed for them costs more than booting one if a job comes)."""
        gpu_s = self.job_gpu_s()
        if gpu_s is None:
            return False
        horizon = signal.boot_s
        free = max(0, capacity - signal.busy_gpus)
        backlog = signal.queued_gpus + self._rate * horizon - free - capacity * horizon / gpu_s
        return backlog >= 1 and self.tail_wait_s(backlog, capacity) > self._limit(signal)

    def _provision(
        self,
        running: list[InstanceView],
        cfg: FleetSettings,
        price: int | None,
        signal: FleetSignal,
        capacity: int,
        free: int,
        booting: int,
    ) -> list[Proposal]:
        """Launches for the queue, of the type that fits it, and up to the minimum."""
        room = cfg.max_instances - len(running)  # the rails would refuse the rest
        kind = fitting_type(signal, cfg)
        out: list[Proposal] = []
        if kind is not None or not signal.offers:  # no catalogue: the configured type
            name = kind.name if kind else cfg.default_instance_type
            cost = kind.price_per_hour if kind else price
            per = max(1, kind.gpus if kind else signal.gpus_per_instance)
            regions = tuple(kind.regions_with_capacity) if kind else signal.regions or (cfg.region,)
            n = self._launches(signal, per, capacity, free, booting)
            largest = signal.largest_queued_gpus
            if per >= largest > max((v.instance.gpus for v in running), default=0):
                n = max(n, 1)  # a job queued fits no instance there is, but fits this type
            wait = self.tail_wait_s(max(0, signal.queued_gpus - free), capacity)
            reason = (
                f"{signal.queued_jobs} job(s) queued: the last would wait {wait / 60:.0f} min "
                f"on {capacity} GPU(s) (target {self._limit(signal) / 60:.0f} min)"
            )
            if cost is not None and regions:
                out += [
                    _launch(cfg, cost, reason, regions[k % len(regions)], name)
                    for k in range(min(n, room))
                ]
        missing = min(cfg.min_instances - len(running) - len(out), room - len(out))
        if price is not None and missing > 0:
            regions = signal.regions or (cfg.region,)
            out += [
                _launch(cfg, price, "below the minimum", regions[k % len(regions)])
                for k in range(missing)
            ]
        return out

    def __call__(
        self,
        views: Sequence[InstanceView],
        cfg: FleetSettings,
        price: int | None,
        signal: FleetSignal,
    ) -> list[Proposal]:
        self._learn(signal)
        running = _running(views)
        booting = sum(v.instance.gpus for v in running if v.instance.status == "booting")
        active_gpus = sum(v.instance.gpus for v in running if v.instance.status == "active")
        free = max(0, active_gpus - signal.busy_gpus)
        capacity = active_gpus + booting
        proposals = self._provision(running, cfg, price, signal, capacity, free, booting)
        if proposals:
            return proposals
        if signal.queued_jobs:
            return []  # work is waiting: nothing idle goes now
        left, count = capacity, len(running)
        idle = [v for v in running if _idle(v, cfg)]
        for v in sorted(idle, key=lambda x: -x.low_streak_min):
            after = left - v.instance.gpus
            if count <= cfg.min_instances or self.work_coming(signal, after):
                break
            left, count = after, count - 1
            proposals.append(
                _terminate(
                    v,
                    f"idle, no job queued, {self._rate * 3600:.1f} job(s)/h arriving: "
                    f"{left} GPU(s) left start them within "
                    f"{self._limit(signal) / 60:.0f} min",
                )
            )
        return proposals


def _idle(v: InstanceView, cfg: FleetSettings) -> bool:
    """Active and running nothing now: below the low threshold, and below half of one GPU's
    share (a node of 8 with one busy GPU is not idle)."""
    last = v.latest
    if v.instance.status != "active" or last is None or last.gpu_util is None:
        return False
    return last.gpu_util < min(cfg.low_gpu_threshold, 50.0 / max(1, v.instance.gpus))
