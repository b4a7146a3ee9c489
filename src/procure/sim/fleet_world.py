"""The fair fleet benchmark's world: a GPU cloud with 1-, 2-, 4- and 8-GPU types in several
regions (capacity per type and region), boots, billing by increment, instances that fail, and
the rails' caps, played scan by scan on simulated time. Every policy sees the same world."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from procure.clouds.base import InstanceType
from procure.clouds.mockworld.placement import Cluster, percentile
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.monitor import InstanceView
from procure.fleet.policies import FleetSignal, Policy
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.fleet.settings import FleetSettings
from procure.store.fleet_tables import FleetInstanceRow, FleetSampleRow

BASE = datetime(2026, 1, 5, tzinfo=UTC)
BILLING = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
REGIONS = ("us-east-1", "us-west-1", "us-south-1")


@dataclass(frozen=True)
class Offer:
    name: str
    description: str
    gpus: int
    usd_per_hour: float


# Lambda's A100 (40 GB) types at its list price of $1.29 per GPU-hour (1x $1.29 ... 8x $10.32).
CATALOGUE: tuple[Offer, ...] = tuple(
    Offer(f"gpu_{n}x_a100", f"{n}x A100 (40 GB {'SXM4' if n == 8 else 'PCIe'})", n, 1.29 * n)
    for n in (1, 2, 4, 8)
)


def default_capacity() -> dict[str, dict[str, int]]:
    """Instances of each type each region can hold: small types are plentiful, 8-GPU nodes
    scarce (as on Lambda, where 8x types are the first out of stock); one region is smaller."""
    per_type = {1: 8, 2: 6, 4: 4, 8: 3}
    return {
        o.name: {r: per_type[o.gpus] // (2 if r == "us-south-1" else 1) for r in REGIONS}
        for o in CATALOGUE
    }


@dataclass(frozen=True)
class World:
    boot_s: float = 600.0
    # Lambda bills from when an instance passes its health checks (booting is free); clouds that
    # bill the boot too (`bill_boot`) make every launch cost a boot's worth more.
    bill_boot: bool = False
    billing_s: float = 60.0  # the billing increment: every increment begun is paid in full
    failures_per_gpu_hour: float = 2e-4  # an instance of n GPUs fails at n times this rate
    checkpoint_s: float = 1800.0  # a failed node's jobs keep their work up to the last one
    capacity: dict[str, dict[str, int]] = field(default_factory=default_capacity)
    quota: int = 40  # the account's instance limit
    seed: int = 0  # the failure draws: the n-th launch of every policy draws the same


@dataclass
class Node:
    id: str
    offer: Offer
    region: str
    launched_at: float
    active_at: float
    fails_at: float
    ended_at: float | None = None
    booted: bool = False
    row: FleetInstanceRow | None = None
    sample: FleetSampleRow | None = None
    high_since: float | None = None
    low_since: float | None = None


@dataclass
class Result:
    policy: str
    workload: str
    billing: str
    cost_usd: float
    idle_gpu_hours: float
    wait_p50_s: float
    wait_p95_s: float
    launches: int
    terminations: int
    blocked: int
    refusals: int
    failures: int
    cap_violations: int
    completed: int
    jobs: int
    # The longest wait and the jobs put back in the queue (a node that failed or was let go
    # under them): what a bound conditioned on waits and unbroken runs needs to know.
    wait_max_s: float = 0.0
    restarts: int = 0


def billed_usd(node: Node, now: float, increment: float, bill_boot: bool = False) -> float:
    """From launch (`bill_boot`) or from when it booted to its end, each increment begun paid
    in full."""
    end = node.ended_at if node.ended_at is not None else now
    start = node.launched_at if bill_boot else node.active_at
    seconds = round(max(0.0, end - start), 3)
    return math.ceil(seconds / increment - 1e-9) * increment * node.offer.usd_per_hour / 3600


def work_floor_usd(jobs: Sequence[JobSpec], world: World) -> float:
    """What no policy can go under: every GPU-second of work at the cheapest price per
    GPU-second, plus, where booting is billed, one boot of an instance that holds the largest
    job (nothing runs before a first instance boots). Failures only add to it."""
    if not jobs:
        return 0.0
    per_gpu_s = min(o.usd_per_hour / o.gpus for o in CATALOGUE) / 3600
    work = sum(j.gpus * j.duration_s for j in jobs)
    largest = max(j.gpus for j in jobs)
    first = min(o.gpus for o in CATALOGUE if o.gpus >= largest)
    return (work + (first * world.boot_s if world.bill_boot else 0.0)) * per_gpu_s


class Sim:
    """One policy's run: the cloud, the queue, the rails."""

    def __init__(
        self, world: World, cfg: FleetSettings, jobs: list[JobSpec], one_cooldown: bool = False
    ) -> None:
        self.world, self.cfg = world, cfg
        # One cooldown for launches and terminations together (Navarch's pool keeps one
        # `lastScale`); else one per action type, as procure's rails keep it.
        self.one_cooldown = one_cooldown
        self.cluster = Cluster(checkpoint_s=world.checkpoint_s, backfill=True)
        self.cluster.submit(jobs, 0.0)
        self._submits = sorted((j.submit_s, j.gpus) for j in jobs)
        self._arrived_index = self.arrived_gpus = 0
        self.nodes: dict[str, Node] = {}
        self.offers = {o.name: o for o in CATALOGUE}
        self.launches = self.terminations = self.blocked = self.refusals = 0
        self.failures = self.violations = 0
        self.last_acted: dict[str, float] = {}
        self.now = 0.0

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.ended_at is None]

    def free(self, name: str, region: str) -> int:
        used = sum(1 for n in self.live() if n.offer.name == name and n.region == region)
        return self.world.capacity.get(name, {}).get(region, 0) - used

    def step(self, until: float) -> None:
        """Boots and failures up to `until`, each at its time, with the jobs in between."""
        while True:
            due = [(n.active_at, 0, n) for n in self.live() if not n.booted]
            due += [(n.fails_at, 1, n) for n in self.live() if n.booted]
            due = [d for d in due if d[0] <= until]
            if not due:
                break
            at, kind, node = min(due, key=lambda d: (d[0], d[1], d[2].id))
            if kind == 0:
                node.booted = True
                self.cluster.add_node(node.id, node.offer.gpus, at)
            else:
                self.failures += 1
                self.end(node, at)
        self.cluster.advance(until)
        self.now = until

    def end(self, node: Node, at: float) -> None:
        node.ended_at = at
        self.cluster.remove_node(node.id, at)

    def views(self, now: datetime) -> list[InstanceView]:
        cfg, out = self.cfg, []
        for n in self.live():
            active = n.booted
            if n.row is None:
                n.row = FleetInstanceRow(
                    instance_id=n.id,
                    name=n.id,
                    instance_type=n.offer.name,
                    region=n.region,
                    ip=None,
                    status="booting",
                    price_per_hour=round(n.offer.usd_per_hour * 1e6),
                    gpus=n.offer.gpus,
                    launched_by=n.id,
                    first_seen_at=BASE + timedelta(seconds=n.launched_at),
                    last_seen_at=now,
                    ended_at=None,
                )
                n.sample = FleetSampleRow(instance_id=n.id, taken_at=now, reachable=True)
            n.row.status = "active" if active else "booting"
            latest = None
            if active and n.sample is not None:
                busy = self.cluster.busy(n.id)
                util = 98.0 * sum(busy) / max(1, len(busy))
                n.sample.gpu_util, n.sample.taken_at = util, now
                latest = n.sample
                n.high_since = (
                    (n.high_since if n.high_since is not None else self.now)
                    if util > cfg.high_gpu_threshold
                    else None
                )
                n.low_since = (
                    (n.low_since if n.low_since is not None else self.now)
                    if util < cfg.low_gpu_threshold
                    else None
                )
            high = (self.now - n.high_since) / 60 if n.high_since is not None else 0.0
            low = (self.now - n.low_since) / 60 if n.low_since is not None else 0.0
            util = latest.gpu_util if latest else None
            out.append(
                InstanceView(
                    n.row, latest, high, low, util if high else None, util if low else None
                )
            )
        return out

    def signal(self, now: datetime, cfg: FleetSettings) -> FleetSignal:
        c = self.cluster
        queued = [c.jobs[j] for j in c.queue]
        while self._arrived_index < len(self._submits) and (
            self._submits[self._arrived_index][0] <= c.now
        ):
            self.arrived_gpus += self._submits[self._arrived_index][1]
            self._arrived_index += 1
        offers = tuple(
            InstanceType(
                o.name,
                o.description,
                o.gpus,
                round(o.usd_per_hour * 1e6),
                [r for r in REGIONS if self.free(o.name, r) > 0],
            )
            for o in CATALOGUE
        )
        kind = self.offers.get(cfg.default_instance_type)
        last = self.last_acted.get(PROVISION)
        return FleetSignal(
            now=now,
            queued_jobs=len(queued),
            queued_gpus=sum(j.spec.gpus for j in queued),
            oldest_wait_s=max((c.now - j.queued_at for j in queued), default=0.0),
            arrived=len(c.jobs) + c.completed - len(c.arrivals),
            completed=c.completed,
            busy_gpus=sum(sum(c.busy(n)) for n in c.nodes),
            gpus_per_instance=kind.gpus if kind else 1,
            boot_s=self.world.boot_s,
            regions=tuple(r for r in REGIONS if kind and self.free(kind.name, r) > 0),
            last_provision_at=None if last is None else BASE + timedelta(seconds=last),
            largest_queued_gpus=max((j.spec.gpus for j in queued), default=0),
            offers=offers,
            billing_increment_s=self.world.billing_s,
            bills_boot=self.world.bill_boot,
            queued=tuple((j.spec.gpus, c.now - j.queued_at) for j in queued),
            arrived_gpus=self.arrived_gpus,
            free_gpus=tuple(
                (n.id, self.cluster.nodes[n.id].gpus.count(None))
                for n in self.live()
                if n.id in self.cluster.nodes
            ),
            placement_known=True,  # the simulated cluster's own placement
            jobs_on=tuple(
                (n.id, self.cluster.job_sizes(n.id)) for n in self.live() if n.id in c.nodes
            ),
        )

    def act(self, p: Proposal, acted: dict[str, float] | None = None) -> None:
        """The rails (cooldown, instance cap, $/h cap), then the cloud with its fallbacks: the
        same type in another region with capacity, for every policy alike. `acted`: when each
        action type last went out before this scan: a cooldown is between decisions, so one
        scan's launches (Navarch's scale to its target, say) are one decision."""
        cfg, now = self.cfg, self.now
        before = self.last_acted if acted is None else acted
        if self.one_cooldown:
            last = max(before.values(), default=None)
        else:
            last = before.get(p.action_type)
        if last is not None and now - last < cfg.action_cooldown_mins * 60:
            self.blocked += 1
            return
        if p.action_type == TERMINATE:
            node = self.nodes.get(p.target or "")
            if node is not None and node.ended_at is None:
                self.end(node, now)
                self.terminations += 1
                self.last_acted[TERMINATE] = now
            return
        offer = self.offers.get(p.instance_type)
        live = self.live()
        hourly = sum(n.offer.usd_per_hour for n in live)
        if offer is None:
            self.refusals += 1
            return
        if len(live) + 1 > cfg.max_instances or hourly + offer.usd_per_hour > (
            cfg.max_hourly_spend + 1e-9
        ):
            self.blocked += 1
            return
        if len(live) >= self.world.quota:
            self.refusals += 1
            return
        regions = [p.region] + [r for r in REGIONS if r != p.region]
        region = next((r for r in regions if self.free(offer.name, r) > 0), None)
        if region is None:
            self.refusals += 1
            return
        self.launches += 1
        draw = random.Random(f"{self.world.seed}:{self.launches}").expovariate(1.0)
        rate = self.world.failures_per_gpu_hour * offer.gpus / 3600
        life = draw / rate if rate > 0 else math.inf
        boot = now + self.world.boot_s
        node = Node(f"n{self.launches}", offer, region, now, boot, boot + life)
        self.nodes[node.id] = node
        self.last_acted[PROVISION] = now


def run(
    name: str,
    decide: Policy,
    cfg: FleetSettings,
    jobs: list[JobSpec],
    workload: str,
    world: World,
    *,
    hours: float,
    drain_hours: float = 96.0,
    one_cooldown: bool = False,
) -> Result:
    """Play `hours` of arrivals, one scan per `cfg.scan_interval_s`, then on until the work is
    done (at most `drain_hours` more), so a policy that leaves jobs queued pays to finish them.
    `one_cooldown`: the cooldown runs from the last action of either type (see `Sim`)."""
    sim = Sim(world, cfg, jobs, one_cooldown)
    c = sim.cluster
    scan = cfg.scan_interval_s
    while sim.now < hours * 3600 or (
        (c.jobs or c.queue or c.arrivals) and sim.now < (hours + drain_hours) * 3600
    ):
        sim.step(sim.now + scan)
        now = BASE + timedelta(seconds=sim.now)
        views = sim.views(now)
        kind = sim.offers.get(cfg.default_instance_type)
        price = round(kind.usd_per_hour * 1e6) if kind else None
        acted = dict(sim.last_acted)
        for p in decide(views, cfg, price, sim.signal(now, cfg)):
            sim.act(p, acted)
        live = sim.live()
        if len(live) > cfg.max_instances or sum(n.offer.usd_per_hour for n in live) > (
            cfg.max_hourly_spend + 1e-9
        ):
            sim.violations += 1
    for n in sim.live():  # the fleet is let go once the work is done
        sim.end(n, sim.now)
    f = c.figures()
    cost = sum(billed_usd(n, sim.now, world.billing_s, world.bill_boot) for n in sim.nodes.values())
    # GPU-hours paid for, increments begun counted whole (as the cost is): idle is what was paid
    # and not used, the rest of an hour let go early included.
    billed_gpu_h = sum(
        billed_usd(n, sim.now, world.billing_s, world.bill_boot)
        / n.offer.usd_per_hour
        * 3600
        * n.offer.gpus
        for n in sim.nodes.values()
    )
    waits = c.wait_times()
    return Result(
        policy=name,
        workload=workload,
        billing=next((k for k, v in BILLING.items() if v == world.billing_s), "custom"),
        cost_usd=round(cost, 4),
        idle_gpu_hours=round(billed_gpu_h / 3600 - f["busy_gpu_hours"], 2),
        wait_p50_s=percentile(waits, 0.50),
        wait_p95_s=percentile(waits, 0.95),
        launches=sim.launches,
        terminations=sim.terminations,
        blocked=sim.blocked,
        refusals=sim.refusals,
        failures=sim.failures,
        cap_violations=sim.violations,
        completed=f["completed"],
        jobs=len(jobs),
        wait_max_s=waits[-1] if waits else 0.0,
        restarts=c.restarts,
    )
