"""The fleet's end-to-end check: one policy, one workload, on the mock cloud's state (boot delays,
prices, capacity and quota refusals, per-second billing) on a manual clock, in-process without
HTTP, but through the controller's real path: its monitor's views, its rails, its action
records (an SQLite store) and its exactly-once launches. Counts cap violations at every scan."""

from __future__ import annotations

import asyncio
import tempfile
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from procure.clouds.base import CapacityError, CloudError, Instance, InstanceType, QuotaError
from procure.clouds.lambda_cloud.catalogue import TYPES
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig, MockCloudState, Refusal
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet import actions, monitor
from procure.fleet.context import FleetContext
from procure.fleet.controller import sync_instances
from procure.fleet.policies import FleetSignal, Policy
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.store import fleet_repo, open_store
from procure.store.fleet_tables import FleetSampleRow

BASE = datetime(2026, 1, 5, tzinfo=UTC)


class SimCloud:
    """`Cloud` over `MockCloudState`, in-process: the mock's answers without HTTP."""

    def __init__(self, state: MockCloudState) -> None:
        self.state = state

    async def instance_types(self) -> list[InstanceType]:
        with self.state.lock:
            return [
                InstanceType(
                    t.name,
                    t.description,
                    t.gpus,
                    t.price_cents_per_hour * 10_000,
                    [r for r in self.state.config.capacity.get(t.name, {}) if self.free(t.name, r)],
                )
                for t in self.state.config.types.values()
            ]

    def free(self, type_name: str, region: str) -> bool:
        return self.state.free_capacity(type_name, region) > 0

    async def instances(self) -> list[Instance]:
        with self.state.lock:
            self.state.step()
            return [
                Instance(
                    i.id,
                    i.name,
                    i.status,  # type: ignore[arg-type]
                    i.type.name,
                    i.region,
                    f"sim-{i.id[:8]}",
                    i.type.price_cents_per_hour * 10_000,
                    i.type.gpus,
                )
                for i in self.state.instances.values()
            ]

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        try:
            return [self.state.launch(instance_type, region, name, ssh_key_names or ["sim"])]
        except Refusal as exc:
            kind = {
                "instance-operations/launch/insufficient-capacity": CapacityError,
                "global/quota-exceeded": QuotaError,
            }.get(exc.code, CloudError)
            raise kind(exc.message) from None

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        live = [i for i in instance_ids if i in self.state.instances]
        ended = {i.id for i in self.state.terminate(live)}
        return [i for i in await self.instances() if i.id in ended]

    async def aclose(self) -> None:
        return None


@dataclass
class BenchRow:
    policy: str
    workload: str
    cost_usd: float
    idle_gpu_hours: float
    wait_p50_s: float
    wait_p95_s: float
    actions: int
    blocked: int
    refusals: int
    cap_violations: int
    completed: int
    jobs: int


def _samples(state: MockCloudState, now: datetime) -> list[FleetSampleRow]:
    out = []
    with state.lock:
        for inst in state.instances.values():
            if inst.status not in ("active", "unhealthy"):
                continue
            busy = state.cluster.busy(inst.id) or [False]
            util = 98.0 * sum(busy) / len(busy)  # what the simulated NVML reports
            out.append(
                FleetSampleRow(instance_id=inst.id, taken_at=now, reachable=True, gpu_util=util)
            )
    return out


def _signal(
    state: MockCloudState,
    cloud_types: list[InstanceType],
    cfg: FleetSettings,
    now: datetime,
    last_up: datetime | None,
) -> FleetSignal:
    c = state.cluster
    kind = next((t for t in cloud_types if t.name == cfg.default_instance_type), None)
    queued = [c.jobs[j] for j in c.queue]
    return FleetSignal(
        now=now,
        queued_jobs=len(queued),
        queued_gpus=sum(j.spec.gpus for j in queued),
        oldest_wait_s=max((c.now - j.queued_at for j in queued), default=0.0),
        arrived=len(c.jobs) + c.completed - len(c.arrivals),
        completed=c.completed,
        busy_gpus=sum(sum(c.busy(n)) for n in c.nodes),
        gpus_per_instance=kind.gpus if kind else 1,
        boot_s=state.config.boot_s,
        regions=tuple(kind.regions_with_capacity) if kind else (),
        last_provision_at=last_up,
        largest_queued_gpus=max((j.spec.gpus for j in queued), default=0),
        offers=tuple(cloud_types),
        queued=tuple((j.spec.gpus, c.now - j.queued_at) for j in queued),
        free_gpus=tuple((n.id, n.gpus.count(None)) for n in c.nodes.values() if not n.stalled),
        placement_known=True,  # the simulated cluster's own placement
        jobs_on=tuple((n.id, c.job_sizes(n.id)) for n in c.nodes.values() if not n.stalled),
    )


async def _run(
    name: str,
    decide: Policy,
    cfg: FleetSettings,
    jobs: list[JobSpec],
    workload: str,
    *,
    hours: float,
    boot_s: float,
    store_dir: Path,
) -> BenchRow:
    state = MockCloudState(MockCloudConfig(speed=0, boot_s=boot_s, nodes=False, quota=50))
    state.cluster.submit(jobs, 0.0)
    store = open_store(f"sqlite:///{store_dir / f'{name}.db'}")
    nodes = bounded_client(deadline_s=1)  # unused: the samples come from the simulation
    cloud = SimCloud(state)
    ctx = FleetContext(
        store=store,
        cloud=cloud,
        nodes=nodes,
        cfg=cfg,
        clock=lambda: BASE + timedelta(seconds=state.clock.now()),
        dry_run=False,
    )
    history: dict[str, deque[FleetSampleRow]] = {}
    keep = int(monitor.lookback(cfg).total_seconds() // cfg.scan_interval_s) + 2
    dedupe = timedelta(minutes=max(cfg.action_cooldown_mins, cfg.confirmation_timeout_mins))
    violations = 0
    seen: frozenset[tuple[str, str]] = frozenset()
    try:
        # The same work for every policy: play `hours`, then on until the work is done (a day
        # at most), so a policy that leaves jobs queued pays for finishing them.
        while state.clock.now() < hours * 3600 or (
            (state.cluster.jobs or state.cluster.queue) and state.clock.now() < (hours + 24) * 3600
        ):
            state.clock.advance(cfg.scan_interval_s)
            now = ctx.clock()
            listing = await cloud.instances()
            current = frozenset((i.id, i.status) for i in listing)
            if current != seen:  # the store follows the cloud (only changes cost a write)
                sync_instances(ctx, listing, now)
                seen = current
            for sample in _samples(state, now):
                history.setdefault(sample.instance_id, deque(maxlen=keep)).append(sample)
            types = await cloud.instance_types()
            with store.session() as s:
                live = fleet_repo.live_instances(s)
                last_up = fleet_repo.last_acted(s, "provision_instance")
            flat = [x for i in live for x in history.get(i.instance_id, ())]
            views = monitor.views(live, flat, cfg, now)
            price = next(
                (t.price_per_hour for t in types if t.name == cfg.default_instance_type), None
            )
            signal = _signal(state, types, cfg, now, last_up)
            for p in decide(views, cfg, price, signal):
                with store.session() as s:
                    last = fleet_repo.recent_same(s, p.action_type, p.target, now - dedupe)
                if last is not None and last.status not in ("executed", "rolled_back"):
                    continue  # as the controller: decided already, not again so soon
                action_id, status = actions.record(ctx, p)
                if status == "approved":
                    await actions.carry_out(ctx, action_id, None)
            with state.lock:
                running = state.live()
                hourly = sum(i.type.price_cents_per_hour for i in running) / 100
            if len(running) > cfg.max_instances or hourly > cfg.max_hourly_spend + 1e-9:
                violations += 1
        figures = state.figures()
        with store.session() as s:
            counts = fleet_repo.count_actions(s)
    finally:
        await nodes.aclose()
        store.dispose()
    return BenchRow(
        policy=name,
        workload=workload,
        cost_usd=figures["billed_usd"],
        idle_gpu_hours=figures["idle_gpu_hours"],
        wait_p50_s=figures["wait_p50_s"],
        wait_p95_s=figures["wait_p95_s"],
        actions=counts.by_status.get("executed", 0),
        blocked=counts.by_status.get("blocked", 0),
        refusals=sum(figures["refusals"].values()),
        cap_violations=violations,
        completed=figures["completed"],
        jobs=len(jobs),
    )


def run_policy(
    name: str,
    decide: Policy,
    cfg: FleetSettings,
    jobs: list[JobSpec],
    workload: str,
    *,
    hours: float,
    boot_s: float = 180.0,
) -> BenchRow:
    """Play `hours` of the fleet's life, one scan per `cfg.scan_interval_s`."""
    with tempfile.TemporaryDirectory(prefix="procure-fleet-bench-") as tmp:
        return asyncio.run(
            _run(name, decide, cfg, jobs, workload, hours=hours, boot_s=boot_s, store_dir=Path(tmp))
        )


def work_floor_usd(jobs: list[JobSpec], cfg: FleetSettings, boot_s: float = 180.0) -> float:
    """The work-only floor no policy can go under: the jobs' GPU-hours at the configured type's
    price per GPU-hour (every second of a launched instance is billed, booting included), plus
    the boot of the minimum fleet, billed before any job can start on it."""
    kind = TYPES[cfg.default_instance_type]
    per_gpu_hour = kind.price_cents_per_hour / 100 / kind.gpus
    work = sum(j.gpus * j.duration_s for j in jobs) / 3600
    boots = cfg.min_instances * kind.gpus * boot_s / 3600
    return (work + boots) * per_gpu_hour
