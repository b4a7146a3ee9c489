"""The clouds benchmark's world and policies: A100 jobs on the three mock clouds' own catalogues,
prices, boot delays, billing rules and Vast.ai's bid outbid hazard, on a simulated clock.

Why a discrete-event simulation rather than the agent over HTTP: `procure demo clouds` drives the
real agent on the mocks and takes most of a minute for one job with one preemption; the goals are
statements about distributions (median, p95, every job within budget) that need tens of jobs of
several hours each, times three policies, which the HTTP path cannot give in minutes on two busy
cores. So the world here is built from the mocks' own objects (Lambda's `TYPES`/`REGIONS`,
RunPod's `GPUS`/stock, a `MockVastState` for Vast.ai's drifting prices and bids, each mock
config's boot delay and `outbid_per_hour`, each provider's billing function), and procure's
choices are made by the agent's own code: each cloud vendor is priced at its best matching offer
with `cloud_offers.matches`/`priced` and the planner's `choices` (as `price_clouds` does), then
`plan_cost_aware` picks among vendors; what it learns (preemptions, boots, GPU-hours, cool-downs
per provider/region/GPU) carries from job to job as the store keeps it. Jobs are independent
(capacity is not contended: one job at a time). Common random numbers: the k-th launch of job j
draws its outbid time and poll delay from the same seeded stream under every policy."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from procure.agent.cloud_offers import matches, priced
from procure.agent.context import PlanContext
from procure.agent.deps import AgentDeps, CloudTuning
from procure.agent.planner import choices, plan_cost_aware
from procure.clouds.base import Offer
from procure.clouds.lambda_cloud import wire as lambda_wire
from procure.clouds.lambda_cloud.catalogue import REGIONS, TYPES
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.runpod import wire as runpod_wire
from procure.clouds.runpod.catalogue import GPUS, default_capacity
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.vast import wire as vast_wire
from procure.clouds.vast.mockstate import MockVastConfig, MockVastState
from procure.models import (
    CloudTerms,
    Job,
    JobSpec,
    JobStatus,
    Payment,
    PaymentStatus,
    Run,
    RunState,
    RunStatus,
    Vendor,
    usd_to_micros,
)
from procure.store.cloud_repo import OfferStats

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
GPU = "A100"
MICROS = 1_000_000
POLL_S = 30.0  # the agent polls a running instance this often: a preemption is noticed within it
MAX_PRICE_USD = 5.0  # each cloud vendor's max $/h (every A100 offer of the mocks is below it)
MAX_LAUNCHES = 200  # a policy that launches more than this for one job gives up on it
POLICIES = ("procure", "on-demand", "spot-restart")


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    jobs: int = 40  # per seed
    min_hours: float = 2.0
    max_hours: float = 6.0
    checkpoint_every: float = 0.05  # fraction of the job between checkpoints
    budget_factor: float = 1.5  # budget = this x the job's expected on-demand cost
    outbid_per_hour: float = MockVastConfig().outbid_per_hour
    boot_scale: float = 1.0  # multiplies every mock's boot delay


@dataclass
class World:
    """One seed's clouds: offers at any simulated second, boot delays, billing."""

    seed: int
    config: Config
    vast: MockVastState = field(init=False)
    boot_s: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        vast = MockVastConfig(seed=self.seed, speed=0, nodes=False, rate_scale=0)
        self.vast = MockVastState(vast)
        runpod = RunPodMockConfig()
        scale = self.config.boot_scale
        self.boot_s = {
            "lambda": MockCloudConfig().boot_s * scale,
            "runpod": (runpod.provision_s + runpod.start_s) * scale,
            "vast": vast.boot_s * scale,
        }

    def offers(self, t: float) -> list[Offer]:
        """Every 1xA100 offer at simulated second `t`, as each provider's client lists it."""
        found: list[Offer] = []
        for name, kind in TYPES.items():
            if kind.gpus == 1 and lambda_wire.gpu_of(name) == GPU:
                price = kind.price_cents_per_hour * 10_000
                found += [_offer("lambda", name, r, price, 60) for r in REGIONS]
        stock = default_capacity()
        for kind in GPUS.values():
            if runpod_wire.canonical_gpu(kind.id) != GPU:
                continue
            for cloud in runpod_wire.CLOUDS:
                price = round(kind.price(cloud) * MICROS)
                oid = runpod_wire.offer_id(cloud, kind.id)
                found += [
                    _offer("runpod", oid, dc, price, runpod_wire.BILLING_INCREMENT_S)
                    for dc, free in stock.get(kind.id, {}).items()
                    if free > 0
                ]
        for m in self.vast.config.machines:
            if vast_wire.canonical_gpu(m.gpu_name) != GPU or m.num_gpus != 1:
                continue
            if m.direct_port_count < 1:  # procure's client skips an ask its node cannot reach
                continue
            inc = vast_wire.BILLING_INCREMENT_S
            dph = vast_wire.micros(self.vast.price(m, t))
            bid = vast_wire.micros(self.vast.min_bid(m, t))
            found.append(_offer("vast", str(m.ask_id), m.geolocation, dph, inc))
            found.append(
                replace(
                    _offer("vast", str(m.ask_id), m.geolocation, bid, inc),
                    interruptible=True,
                    min_bid_per_hour=bid,
                )
            )
        return sorted(found, key=lambda o: (o.price_per_hour, o.provider, o.offer_id, o.region))

    def billed(self, offer: Offer, launched: float, running: float, end: float) -> int:
        """Micro-USD the provider's mock bills for an instance launched at `launched`, running
        from `running`, gone at `end` (its own rule: Lambda whole minutes from active, RunPod
        every started second from creation, Vast.ai every started second while running)."""
        if offer.provider == "lambda":
            return lambda_wire.cost_micros(offer.price_per_hour, max(0.0, end - running))
        start = launched if offer.provider == "runpod" else running
        # Vast's mock bills the same per-started-second rule (MockVastState.billed_micros).
        return runpod_wire.billed_micros(offer.price_per_hour / MICROS, max(0.0, end - start))


def _offer(provider: Any, offer_id: str, region: str, price: int, increment: int) -> Offer:
    return Offer(provider, offer_id, GPU, 1, region, price, False, 1, increment)


@dataclass(frozen=True)
class JobCase:
    index: int
    start: float  # simulated second
    hours: float
    budget: int  # micro-USD


@dataclass
class Outcome:
    policy: str
    seed: int
    job: int
    hours: float
    budget: int
    cost: int = 0
    completed: bool = False
    seconds: float | None = None  # from the job's start to its completion
    launches: int = 0
    preemptions: int = 0
    offers: list[str] = field(default_factory=list)  # provider/kind of each launch

    @property
    def within_budget(self) -> bool:
        return self.completed and self.cost <= self.budget


@dataclass(frozen=True)
class Life:
    """What became of one instance."""

    end: float  # billing stops (done, preempted, or terminated for the budget)
    noticed: float  # when the agent knows and decides again
    progress: float  # the job's progress it leaves (its last checkpoint unless done)
    cost: int
    outcome: str  # done | preempted | budget
    boot: float
    running_hours: float


def live(
    world: World,
    offer: Offer,
    t: float,
    progress: float,
    case: JobCase,
    key: str,
    *,
    resume: bool = True,
    money_left: float = math.inf,
) -> Life:
    """Launch `offer` at `t` for the job from `progress`; play it to its end. `money_left`: the
    instance is terminated one increment and the agent's reserve ahead before it is spent."""
    rng = random.Random(f"{world.seed}:{key}")
    outbid = rng.expovariate(world.config.outbid_per_hour / 3600) if offer.interruptible else 0
    poll = rng.uniform(0, POLL_S)
    boot = world.boot_s[offer.provider]
    running = t + boot
    start = progress if resume else 0.0
    done = running + (1 - start) * case.hours * 3600
    end, outcome = done, "done"
    if offer.interruptible and running + outbid < end:
        end, outcome = running + outbid, "preempted"
    if money_left < math.inf:
        billed_from = t if offer.provider == "runpod" else running
        ahead = CloudTuning().reserve_ahead_s + offer.billing_increment_s
        stop = billed_from + money_left * 3600 / offer.price_per_hour - ahead
        if stop < end:
            end, outcome = max(t, stop), "budget"
    worked = max(0.0, end - running)
    reached = start + worked / (case.hours * 3600)
    step = world.config.checkpoint_every
    left = 1.0 if outcome == "done" else math.floor(reached / step + 1e-9) * step
    return Life(
        end=end,
        noticed=end if outcome == "done" else end + poll,
        progress=max(left, start) if resume else (1.0 if outcome == "done" else 0.0),
        cost=world.billed(offer, t, running, end),
        outcome=outcome,
        boot=boot,
        running_hours=worked / 3600,
    )


# --- the baselines ----------------------------------------------------------------------


def cheapest(world: World, t: float, interruptible: bool) -> Offer:
    return next(o for o in world.offers(t) if o.interruptible == interruptible)


def baseline(world: World, case: JobCase, *, interruptible: bool, name: str) -> Outcome:
    """(a) always the cheapest on-demand offer; (b) always the cheapest interruptible offer,
    restarting from scratch after each preemption. Neither watches the budget."""
    out = Outcome(name, world.seed, case.index, case.hours, case.budget)
    t = case.start
    while out.launches < MAX_LAUNCHES:
        offer = cheapest(world, t, interruptible)
        life = live(world, offer, t, 0.0, case, f"{case.index}:{out.launches}", resume=False)
        _count(out, offer, life)
        if life.outcome == "done":
            out.completed, out.seconds = True, life.end - case.start
            break
        t = life.noticed
    return out


def _count(out: Outcome, offer: Offer, life: Life) -> None:
    out.launches += 1
    out.cost += life.cost
    out.preemptions += life.outcome == "preempted"
    out.offers.append(f"{offer.provider}/{'bid' if offer.interruptible else 'on-demand'}")


# --- procure ----------------------------------------------------------------------------


def cloud_vendors() -> list[Vendor]:
    """The three cloud accounts as `procure vendors add-cloud` registers them (the demo's
    reliability prior); Vast.ai with bids allowed."""
    return [
        Vendor(
            vendor_id=f"{p}-a100",
            name=p.title(),
            endpoint=f"cloud://{p}",
            base_price_per_hour=usd_to_micros(MAX_PRICE_USD),
            reliability_score=0.95,
            supported_gpu_types=[GPU],
            kind="cloud",
            cloud=CloudTerms(
                provider=p,  # type: ignore[arg-type]
                gpu=GPU,
                count=1,
                max_price_per_hour=usd_to_micros(MAX_PRICE_USD),
                spot=p == "vast",
            ),
            created_at=EPOCH,
            updated_at=EPOCH,
        )
        for p in ("lambda", "runpod", "vast")
    ]


Learned = dict[tuple[str, str, str], OfferStats]


def _at(t: float) -> datetime:
    return EPOCH + timedelta(seconds=t)


def _context(
    case: JobCase, t: float, progress: float, spent: int, seed: int, step: float
) -> PlanContext:
    run = Run(
        _id=f"bench-{seed}-{case.index}",
        user_id="bench",
        goal="clouds benchmark job",
        status=RunStatus.running,
        budget_total=case.budget,
        budget_remaining=case.budget - spent,
        job_spec=JobSpec(gpu_type=GPU, hours=case.hours, checkpoint_every=step),
        created_at=_at(case.start),
        updated_at=_at(t),
    )
    job = Job(
        _id=f"j{seed}-{case.index}",
        run_id=run.id,
        vendor_id="bench",
        status=JobStatus.failed,
        expected_cost=0,
        idempotency_key=f"k{seed}-{case.index}",
        checkpoint_url="sim://checkpoint" if progress > 0 else None,
        checkpoint_progress=progress,
        created_at=_at(case.start),
        updated_at=_at(t),
    )
    paid = Payment(
        _id=f"p{seed}-{case.index}",
        run_id=run.id,
        job_id=job.id,
        vendor_id="bench",
        amount=spent,
        status=PaymentStatus.completed,
        nonce="bench",
        created_at=_at(t),
        updated_at=_at(t),
    )
    state = RunState(run=run, jobs=[job], payments=[paid] if spent else [], observations=[])
    return PlanContext(state=state, vendors=[], now=_at(t))


def _priced_vendors(
    deps: AgentDeps, ctx: PlanContext, offers: list[Offer], learned: Learned
) -> tuple[list[Vendor], dict[str, Offer]]:
    """Each cloud vendor at its best offer now, as `cloud_offers.price_clouds` prices it."""
    vendors: list[Vendor] = []
    by_id: dict[str, Offer] = {}
    for vendor in cloud_vendors():
        copies = []
        for i, offer in enumerate(o for o in offers if matches(vendor, o)):
            stats = learned.get((offer.provider, offer.region, offer.gpu), OfferStats())
            if stats.cooldown_until is not None and stats.cooldown_until > ctx.now:
                continue
            copy = priced(deps, vendor, offer, stats, f"{vendor.vendor_id}#{i}")
            copies.append(copy)
            by_id[copy.vendor_id] = offer
        if not copies:
            continue
        ranked = choices(ctx, copies)
        best = ranked[0].vendor if ranked else min(copies, key=lambda v: v.base_price_per_hour)
        vendors.append(best)  # keeps its ranking id, so the plan names the offer
    return vendors, by_id


def procure(world: World, case: JobCase, learned: Learned) -> Outcome:
    """The agent's loop for one job: plan, launch, play the instance, learn, plan again."""
    deps: Any = SimpleNamespace(cloud=CloudTuning())
    cooldown_s = 300.0  # AgentDeps.cooldown_s's default
    out = Outcome("procure", world.seed, case.index, case.hours, case.budget)
    t, progress = case.start, 0.0
    for _ in range(MAX_LAUNCHES * 4):
        if out.launches >= MAX_LAUNCHES:
            break
        ctx = _context(case, t, progress, out.cost, world.seed, world.config.checkpoint_every)
        vendors, by_id = _priced_vendors(deps, ctx, world.offers(t), learned)
        action = plan_cost_aware(replace(ctx, vendors=vendors))
        if action.action != "start_job" or action.vendor_id not in by_id:
            if not vendors or action.action == "wait":
                t += 60.0  # RETRY_OFFERS_S: offers are asked again
                continue
            break  # unaffordable: the run fails
        offer = by_id[action.vendor_id]
        key = f"{case.index}:{out.launches}"
        life = live(world, offer, t, progress, case, key, money_left=case.budget - out.cost)
        _count(out, offer, life)
        stats = learned.get((offer.provider, offer.region, offer.gpu), OfferStats())
        learned[(offer.provider, offer.region, offer.gpu)] = _learn(stats, life, cooldown_s)
        progress, t = life.progress, life.noticed
        if life.outcome == "done":
            out.completed, out.seconds = True, life.end - case.start
            break
        if life.outcome == "budget":
            break
    return out


def _learn(stats: OfferStats, life: Life, cooldown_s: float) -> OfferStats:
    # As cloud_run records an instance: its boot, GPU-hours, and a preemption with a cool-down.
    cool = _at(life.noticed + cooldown_s) if life.outcome == "preempted" else stats.cooldown_until
    return replace(
        stats,
        successes=stats.successes + (life.outcome == "done"),
        preemptions=stats.preemptions + (life.outcome == "preempted"),
        gpu_hours=stats.gpu_hours + life.running_hours,
        boots=stats.boots + 1,
        boot_seconds=stats.boot_seconds + life.boot,
        cooldown_until=cool,
    )


# --- one run: every policy on the same seeds -----------------------------------------------


def cases(world: World) -> list[JobCase]:
    """The seed's jobs: a few hours each, one a day, budget a multiple of the expected cost on
    the cheapest on-demand offer at the job's start (boot billed where the provider bills it)."""
    rng = random.Random(f"{world.seed}:jobs")
    found = []
    for j in range(world.config.jobs):
        start = j * 86_400.0 + rng.uniform(0, 3_600)
        hours = round(rng.uniform(world.config.min_hours, world.config.max_hours), 3)
        offer = cheapest(world, start, False)
        running = start + world.boot_s[offer.provider]
        expected = world.billed(offer, start, running, running + hours * 3600)
        found.append(JobCase(j, start, hours, round(world.config.budget_factor * expected)))
    return found


def run_policies(config: Config) -> list[Outcome]:
    outcomes: list[Outcome] = []
    for seed in config.seeds:
        world = World(seed, config)
        learned: Learned = {}
        for case in cases(world):
            outcomes.append(procure(world, case, learned))
            outcomes.append(baseline(world, case, interruptible=False, name="on-demand"))
            outcomes.append(baseline(world, case, interruptible=True, name="spot-restart"))
    return outcomes


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per policy: total and mean cost ($), ratio to on-demand, completion within budget,
    median and p95 completion hours (an unfinished job counts as never), launches, preemptions."""
    base = sum(o.cost for o in outcomes if o.policy == "on-demand") or 1
    table: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        mine = [o for o in outcomes if o.policy == policy]
        hours = [o.seconds / 3600 if o.seconds is not None else math.inf for o in mine]
        cost = sum(o.cost for o in mine)
        table[policy] = {
            "jobs": len(mine),
            "costUsd": cost / MICROS,
            "meanCostUsd": cost / MICROS / max(1, len(mine)),
            "ratioToOnDemand": cost / base,
            "completed": sum(o.completed for o in mine),
            "withinBudget": sum(o.within_budget for o in mine),
            "medianHours": _quantile(hours, 0.5),
            "p95Hours": _quantile(hours, 0.95),
            "launches": sum(o.launches for o in mine),
            "preemptions": sum(o.preemptions for o in mine),
        }
    return table


def bounds(config: Config) -> dict[str, float]:
    """Floors no policy can beat, to show when a goal is out of reach: the cost of every job run
    once at its cheapest offer (the cheapest bid, never preempted, nothing booted or redone) over
    on-demand's, and the fastest completion (work plus the shortest boot) over on-demand's."""
    floor_cost = od_cost = 0.0
    floor_h: list[float] = []
    od_h: list[float] = []
    for seed in config.seeds:
        world = World(seed, config)
        for case in cases(world):
            bid = cheapest(world, case.start, True)
            floor_cost += bid.price_per_hour * case.hours
            od = cheapest(world, case.start, False)
            boot = world.boot_s[od.provider]
            od_cost += world.billed(
                od, case.start, case.start + boot, case.start + boot + 3600 * case.hours
            )
            floor_h.append(case.hours + min(world.boot_s.values()) / 3600)
            od_h.append(case.hours + boot / 3600)
    return {
        "costFloorRatio": floor_cost / max(od_cost, 1.0),
        "medianHoursFloorRatio": statistics.median(floor_h) / statistics.median(od_h),
    }


def goals(table: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    ours, a, b = table["procure"], table["on-demand"], table["spot-restart"]
    return [
        ("every procure job completes within its budget", ours["withinBudget"] == ours["jobs"]),
        ("procure at least 25 % cheaper than (a) on-demand", ours["ratioToOnDemand"] <= 0.75),
        ("procure cheaper than (b) spot with restart", ours["costUsd"] < b["costUsd"]),
        (
            "procure's median completion <= 1.3 x (a)'s",
            ours["medianHours"] <= 1.3 * a["medianHours"],
        ),
    ]
