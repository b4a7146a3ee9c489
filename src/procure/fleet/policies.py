"""Scaling policies beside the seed's rule (which `policy.decide` keeps, unchanged): a static fleet,
a cluster-autoscaler-like rule, a Navarch-like rule, and procure's own, which reads the job
queue and the provider's billing increment: it launches for a job once it would otherwise wait
past its target, packs jobs onto the cheapest types that hold them, keeps an idle instance
while its paid increment lasts, and moves a long job left alone on a big node to a smaller one.
Each only proposes; the rails decide, whatever a policy says."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from procure.clouds.base import InstanceType
from procure.fleet import policy
from procure.fleet.billing import BillingClock, renews_for_little, unneeded_boots
from procure.fleet.consolidate import idle as _idle
from procure.fleet.consolidate import launch as _launch
from procure.fleet.consolidate import right_size
from procure.fleet.consolidate import terminate as _terminate
from procure.fleet.monitor import InstanceView
from procure.fleet.policy import TERMINATE, Proposal
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
    billing_increment_s: float = 1.0  # the provider bills every increment begun in full
    queued: tuple[tuple[int, float], ...] = ()  # per queued job, in order: (GPUs, waited s)
    free_gpus: tuple[tuple[str, int], ...] = ()  # per active instance: (id, GPUs free now)
    arrived_gpus: int = 0  # GPUs asked by the jobs submitted so far (a counter)
    bills_boot: bool = False  # billing starts at launch (else once booted, as on Lambda)
    # False: the queue could not be read (or there is no queue source), so `queued` says
    # nothing; no boot is called off and no node moved on the queue's account.
    queue_known: bool = True
    # True: `free_gpus` is the scheduler's exact placement (the simulated cluster's), not an
    # estimate from utilisation; jobs are moved between nodes only then.
    placement_known: bool = False
    # With the placement known: per active instance, the GPUs each job on it uses.
    jobs_on: tuple[tuple[str, tuple[int, ...]], ...] = ()


Policy = Callable[[Sequence[InstanceView], FleetSettings, int | None, FleetSignal], list[Proposal]]


def _running(views: Sequence[InstanceView]) -> list[InstanceView]:
    return [v for v in views if v.instance.status in RUNNING_STATUSES]


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


PER_REGION = 4  # launches of one type per region listed with capacity, in one scan
# The largest burst, in boots' worth of the arrival rate, that a target near zero keeps free GPUs
# for (a sweep of 20 jobs at once is ~50 boots' worth of a quiet day's rate): the rails' caps,
# not this, bound the fleet there; it lets the headroom fall to nothing once arrivals stop.
MAX_BURST = 100.0
# Billed by long increments, a target shorter than this many boots launches a moved job's
# replacement ahead of its node's increment's end (consolidate.right_size's `ahead`): launched
# at that end instead, it is never bought for a job that ends first, but the job waits a boot
# (measured on the fleet benchmark by the hour: cheaper at targets of 30 min and more, at equal
# p95 wait; at 10-15 min cheaper too but its p95 a minute longer, at 20 min no cheaper).
AHEAD_BOOTS = 3.0


@dataclass
class ProcurePolicy:
    """procure's policy: as little billed beyond the work as a queue-wait target allows, on
    whatever billing increment the provider uses.

    - Up: a queued job that no instance (active, or booting with room for it) will take is
      launched for once it has waited `target_wait_s` less a boot, so that it starts within the
      target; meanwhile a job that ends may free a place for it, and then nothing is bought.
      Launches are packed: each job gets the cheapest type with capacity that holds it (the
      configured GPU, `same_gpu`), and the room left on a new instance takes the jobs queued
      behind it; near the instance cap it packs onto the largest type instead.
    - Down: an instance that runs nothing is already paid until the end of its billing
      increment, so it is kept while that lasts (a job that arrives takes it at no cost and
      without a boot); it goes at the last scan before its next increment begins, once it has
      been idle for `hold_s` (ski rental: staying idle that long costs what booting another
      would); with per-second billing that is at once after the hold. Its increments are
      counted from when billing began (the end of its boot, where the cloud bills from there).
      Billed by long increments, a boot that no queued job needs any more is called off before it
      ends (booting is free; its first hour is not), as is one the jobs queued would fill at most
      half of where a smaller type holds them (they get their own size, a boot later, where that
      still starts them within the target; not at the instance cap, where the last launch is the
      largest type, nor under the rails' launch cooldown, which would hold theirs, nor where they
      would take the room of a due job on another boot), and a half-used node whose jobs fit on
      another node in use goes at the end of its increment (they move there, nothing bought), as
      does one whose jobs came too late for a replacement to boot before that end: they restart
      on the smaller types launched for them then (`consolidate.restarts`; renewing would buy its
      free GPUs for a whole increment); an idle node
      with more GPUs than the average job goes in its increment's last quarter (a small job landing
      then would renew all of it; only where arrivals are counted, as the simulators do). A moved
      node's replacement is launched only where it boots before that node's increment ends and, with
      a target of `AHEAD_BOOTS` boots or more, not ahead at all: its jobs then restart on types
      launched at that end (one launched ahead is billed a whole increment from its boot, even where
      the job it was for ends first).
    - Moves (only where the scheduler's placement is known, as in the simulators): a node with
      GPUs to spare for `migrate_after_s` is replaced by smaller types that hold its jobs
      (`consolidate.right_size`).

    - Headroom: a target shorter than a boot cannot be met by launching when a job comes; it
      then keeps free GPUs for the jobs that arrive within a boot less the target (the GPU
      arrival rate it has seen times that span, times the boot over the target: the bursts a
      shorter target must absorb), launching for them and letting none go below; once
      arrivals stop, the headroom goes.

    The one knob is `target_wait_s`: lower buys shorter queues, higher buys a cheaper fleet.
    """

    target_wait_s: float = 1800.0  # how long a queued job may wait for a place before a launch
    hold_s: float | None = 0.0  # idle time before letting go (None: one boot)
    migrate_after_s: float = 600.0  # a node with GPUs to spare this long is replaced
    _frag_since: dict[str, datetime] = field(default_factory=dict, repr=False)
    _replacing: dict[str, datetime] = field(default_factory=dict, repr=False)
    half_life_min: float = 60.0  # how fast the learned GPU arrival rate forgets
    _gpu_rate: float = 0.0  # GPUs asked per second by arriving jobs (EWMA)
    _last: tuple[datetime, int] | None = field(default=None, repr=False)
    _billing: BillingClock = field(default_factory=BillingClock, repr=False)

    def paid_left_s(self, v: InstanceView, signal: FleetSignal) -> float:
        """Seconds left of the increment the instance is being billed for (0: per second)."""
        return self._billing.paid_left_s(v, signal)

    def _learn(self, signal: FleetSignal) -> None:
        if self._last is not None:
            at, arrived = self._last
            dt = (signal.now - at).total_seconds()
            if dt > 0:
                keep = 0.5 ** (dt / 60 / self.half_life_min)
                rate = max(0, signal.arrived_gpus - arrived) / dt
                self._gpu_rate = keep * self._gpu_rate + (1 - keep) * rate
        self._last = (signal.now, signal.arrived_gpus)

    def spare_gpus(self, signal: FleetSignal) -> int:
        """Free GPUs to keep: those the jobs arriving within a boot less the target ask for,
        times the boot over the target (arrivals come in bursts: the shorter the target, the
        larger the burst it must absorb; up to `MAX_BURST`, where nearly every job must find a
        place at once and only the caps bound the fleet)."""
        span = max(0.0, signal.boot_s - self.target_wait_s)
        if span <= 0:
            return 0
        burst = min(MAX_BURST, signal.boot_s / max(self.target_wait_s, 1.0))
        expected = self._gpu_rate * span * burst
        # The learned rate only decays, never to zero: below a twentieth of a GPU the arrivals
        # have stopped, and the last GPU kept for them goes too.
        return 0 if expected < 0.05 else math.ceil(expected - 1e-9)

    def _hold(self, signal: FleetSignal) -> float:
        return signal.boot_s if self.hold_s is None else self.hold_s

    def __call__(
        self,
        views: Sequence[InstanceView],
        cfg: FleetSettings,
        price: int | None,
        signal: FleetSignal,
    ) -> list[Proposal]:
        self._learn(signal)
        running = _running(views)
        self._billing.track(running, signal)
        moving = bool(self._replacing)
        out = self._provision(running, cfg, price, signal)
        # One count of the instances left, across every way one goes this scan: none of them
        # may take the pool below the minimum, whatever the others did.
        left = len(running)
        homes: set[str] = set()  # where this scan's moved jobs go: none of them is let go
        if signal.queue_known and signal.placement_known:
            moved = self._right_size(running, cfg, signal, len(out), left, homes)
            out += moved
            left -= sum(p.action_type == TERMINATE for p in moved)
        gone = {p.target for p in out if p.action_type == TERMINATE} | homes
        # An idle instance with jobs queued holds none of them (the scheduler would have placed
        # it there): it may go all the same, whether the queue could be read or not.
        released = self._release(running, cfg, signal, moving, left, gone)
        left -= len(released)
        if not signal.queue_known:
            return out + released
        return out + released + self._cancel_boots(running, cfg, signal, moving, left)

    def _cancel_boots(
        self,
        running: list[InstanceView],
        cfg: FleetSettings,
        signal: FleetSignal,
        moving: bool,
        count: int,
    ) -> list[Proposal]:
        """Boots no queued job needs any more, or only jobs a smaller type holds
        (`billing.unneeded_boots`), are called off, but not those launched as headroom or to
        take a moved job, nor under the minimum."""
        if moving or self.spare_gpus(signal) > 0:
            return []
        out: list[Proposal] = []
        # At the instance cap the jobs' own launch would be the largest type again (the last
        # instance the cap allows holds as many GPUs as it can): keep the boot there. Under the
        # rails' cooldown between launches, their launch waits out the cooldown of this boot's
        # own (and of any launch after it), past their target: keep it there too.
        own_size = len(running) < cfg.max_instances and cfg.action_cooldown_mins <= 0
        offers = self._offers(cfg, signal) if own_size else []
        step = 1.5 * cfg.scan_interval_s
        # Jobs that would take a boot called off still start within the target on their own.
        patience = self.target_wait_s - signal.boot_s - step
        for v, taken in unneeded_boots(running, signal, step, offers, patience):
            if count <= cfg.min_instances:
                break
            count -= 1
            reason = "booting for a job that found a place elsewhere; billing has not begun"
            if taken:
                reason += (
                    f"; the jobs queued for it fill {taken} of its {v.instance.gpus} GPUs: "
                    "a smaller type is launched for them"
                )
            out.append(_terminate(v, reason))
        return out

    def _right_size(
        self,
        running: list[InstanceView],
        cfg: FleetSettings,
        signal: FleetSignal,
        launching: int,
        left: int,
        homes: set[str],
    ) -> list[Proposal]:
        return right_size(
            running,
            cfg,
            signal,
            offers=[t for t in self._offers(cfg, signal) if t.regions_with_capacity],
            launching=launching,
            left=left,
            frag_since=self._frag_since,
            replacing=self._replacing,
            migrate_after_s=self.migrate_after_s,
            paid_left=lambda v: self.paid_left_s(v, signal),
            keep=homes,
            # Launched at its node's increment's end, not ahead, a replacement leaves the jobs
            # moved a boot's wait: only where the target leaves room for it.
            ahead=self.target_wait_s < AHEAD_BOOTS * signal.boot_s,
        )

    def _provision(
        self,
        running: list[InstanceView],
        cfg: FleetSettings,
        price: int | None,
        signal: FleetSignal,
    ) -> list[Proposal]:
        room = min(cfg.max_instances - len(running), 10_000)
        spend = usd_micros(cfg.max_hourly_spend) - sum(v.instance.price_per_hour for v in running)
        out: list[Proposal] = []
        # Queued jobs first take the room on instances still booting (first fit, in order).
        free = [v.instance.gpus for v in running if v.instance.status == "booting"]
        waiting: list[tuple[int, float]] = []
        for gpus, waited in signal.queued:
            slot = next((k for k, f in enumerate(free) if f >= gpus), None)
            if slot is None:
                waiting.append((gpus, waited))
            else:
                free[slot] -= gpus
        due_after = max(0.0, self.target_wait_s - signal.boot_s)
        offers = self._offers(cfg, signal)
        # The catalogue says which regions have room, not how much: a few launches per region
        # listed, spread over them; the cloud refuses the rest and the next scan sees it.
        capacity = {t.name: PER_REGION * len(t.regions_with_capacity) for t in offers}
        used: dict[str, int] = {}
        opened: list[int] = []  # room left on each instance launched now
        for index, (gpus, waited) in enumerate(waiting):
            slot = next((k for k, f in enumerate(opened) if f >= gpus), None)
            if slot is not None:
                opened[slot] -= gpus
                continue
            if waited < due_after or room <= 0:
                continue
            near_cap = room <= 1
            fits = [
                t
                for t in offers
                if t.gpus >= gpus and capacity.get(t.name, 0) > 0 and t.price_per_hour <= spend
            ]
            if not fits:
                continue
            if near_cap:  # the last instance the cap allows: as many GPUs as it can hold
                kind = max(fits, key=lambda t: (t.gpus, -t.price_per_hour))
            else:
                behind = sum(g for g, _ in waiting[index + 1 :])
                kind = min(fits, key=lambda t: _launch_cost(t, gpus, behind))
            capacity[kind.name] -= 1
            used[kind.name] = used.get(kind.name, 0) + 1
            room -= 1
            spend -= kind.price_per_hour
            opened.append(kind.gpus - gpus)
            regions = kind.regions_with_capacity
            wait = max((w for _, w in waiting), default=0.0)
            reason = (
                f"{len(waiting)} job(s) queued with no place coming, the oldest for "
                f"{wait / 60:.0f} min (target {self.target_wait_s / 60:.0f} min): "
                f"{kind.name} holds a {gpus}-GPU job"
            )
            region = regions[(used[kind.name] - 1) % len(regions)]
            out.append(_launch(cfg, kind.price_per_hour, reason, region, kind.name))
        spare = sum(f for _, f in signal.free_gpus) + sum(free) + sum(opened)
        short = self.spare_gpus(signal) - spare
        if short > 0 and room > 0 and not waiting:
            fits = [t for t in offers if capacity.get(t.name, 0) > 0 and t.price_per_hour <= spend]
            kind = min(fits, key=lambda t: (t.gpus < min(short, 8), t.price_per_hour), default=None)
            if kind is not None:
                room -= 1
                out.append(
                    _launch(
                        cfg,
                        kind.price_per_hour,
                        f"headroom: {spare} GPU(s) free, {short + spare} kept for the "
                        f"{self._gpu_rate * 3600:.1f} GPU(s)/h arriving",
                        kind.regions_with_capacity[0],
                        kind.name,
                    )
                )
        missing = min(cfg.min_instances - len(running) - len(out), room)
        if price is not None and missing > 0:
            regions = signal.regions or (cfg.region,)
            out += [
                _launch(cfg, price, "below the minimum", regions[k % len(regions)])
                for k in range(missing)
            ]
        return out

    def _offers(self, cfg: FleetSettings, signal: FleetSignal) -> list[InstanceType]:
        """The types it may launch: those with the configured type's GPU (the jobs say how many
        GPUs they need, not which); with no catalogue, the configured type alone."""
        default = next((t for t in signal.offers if t.name == cfg.default_instance_type), None)
        if default is None:
            regions = list(signal.regions or (cfg.region,))
            per = max(1, signal.gpus_per_instance)
            return [InstanceType(cfg.default_instance_type, "", per, 0, regions)]
        return [t for t in signal.offers if same_gpu(t, default)]

    def _release(
        self,
        running: list[InstanceView],
        cfg: FleetSettings,
        signal: FleetSignal,
        moving: bool,
        count: int,
        gone: set[str | None],
    ) -> list[Proposal]:
        out: list[Proposal] = []
        step = 1.5 * cfg.scan_interval_s  # the next scan may come a little late
        keep = self.spare_gpus(signal)
        spare = sum(f for _, f in signal.free_gpus) - keep
        increment = max(1.0, signal.billing_increment_s)
        for v in sorted(running, key=lambda x: -x.low_streak_min):
            if count <= cfg.min_instances:
                break
            if v.id in gone or not _idle(v, cfg) or v.low_streak_min * 60 < self._hold(signal):
                continue
            if keep and spare - v.instance.gpus < 0:
                continue  # kept as headroom
            age = (signal.now - v.instance.first_seen_at).total_seconds()
            if moving and age < 2 * signal.boot_s + step:
                continue  # booted to take a moved job: it waits for it
            paid_left = self.paid_left_s(v, signal)
            early = paid_left > step and renews_for_little(v, signal, paid_left)
            if paid_left > step and not early:
                continue  # paid for already: kept, free, for whatever comes
            count -= 1
            spare -= v.instance.gpus
            why = "no job queued" if not early else "more GPUs than a job asks on average"
            out.append(
                _terminate(
                    v,
                    f"idle {v.low_streak_min:.0f} min, {why}, its paid "
                    f"{increment / 60:g}-min increment ends in {paid_left / 60:.0f} min",
                )
            )
        return out


def _launch_cost(t: InstanceType, gpus: int, behind: int) -> tuple[float, int, str]:
    """How to rank a type for a job of `gpus` with `behind` GPUs queued after it: price per GPU
    it will use (room filled by the jobs behind, up to its size), then the fewest GPUs (a job
    left alone on a big node wastes the rest: durations are heavy-tailed)."""
    used = min(t.gpus, gpus + behind)
    return (t.price_per_hour / used, t.gpus, t.name)


def usd_micros(usd: float) -> int:
    return round(usd * 1e6)
