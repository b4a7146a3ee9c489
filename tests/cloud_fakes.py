"""An in-process fake of a `RentalCloud` (offers, launch by name, boot delay, preemption, billing
by increment, faults) whose instances host fake GPU nodes with a job runner, and helpers to build
the agent's deps over them and drive a run to its end."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet
from eth_account import Account

from procure.agent.cloud_node import NodeError, NodeJob
from procure.agent.deps import AgentDeps, CloudTuning
from procure.agent.tick import tick
from procure.clouds.base import (
    LABEL_PREFIX,
    CapacityError,
    Instance,
    LaunchSpec,
    Offer,
    ProviderError,
)
from procure.models import TERMINAL_RUN_STATUSES, CloudTerms, JobSpec, Vendor
from procure.payments.settlements import FacilitatorLedger
from procure.store import Store, open_store, repo
from procure.vendors.client import VendorClient
from procure.vendors.credentials import Keyring
from stores import migrated_if_new

_ips = itertools.count(2)


@dataclass
class FakeJob:
    id: str
    key: str
    started: float
    start_progress: float
    duration_s: float
    checkpoint_every: float
    status: str = "running"
    ended_progress: float | None = None

    def progress(self, now: float) -> float:
        if self.ended_progress is not None:
            return self.ended_progress
        done = (now - self.started) / self.duration_s
        return min(1.0, self.start_progress + done)


@dataclass
class FakeNode:
    ip: str
    token: str
    job_s: float  # seconds for the whole job (0 → 1)
    checkpoint_every: float = 0.25
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    alive: bool = True

    @property
    def url(self) -> str:
        return f"http://{self.ip}:9876"

    def die(self, now: float) -> None:
        self.alive = False
        for job in self.jobs.values():
            if job.status == "running":
                job.ended_progress = job.progress(now)
                job.status = "failed"


def _checkpoint(key: str, progress: float, every: float) -> tuple[str | None, float]:
    saved = math.floor(progress / every + 1e-9) * every
    if saved <= 0:
        return None, 0.0
    return f"memory://ckpt/{key}/{saved:.2f}", round(saved, 6)


class FakeNodeClient:
    """`NodeRunner` over a fake node; refuses a wrong token as the real node would."""

    def __init__(self, cloud: FakeCloud, url: str, token: str) -> None:
        self.node = next((n for n in cloud.nodes.values() if n.url == url), None)
        self.cloud = cloud
        if self.node is not None and token != self.node.token:
            raise AssertionError("a node token went to the wrong node")

    def _live(self) -> FakeNode:
        if self.node is None or not self.node.alive:
            raise NodeError("connection refused")
        return self.node

    def _view(self, job: FakeJob) -> NodeJob:
        now = self.cloud.clock()
        progress = job.progress(now)
        if job.status == "running" and progress >= 1.0:
            job.status = "completed"
        url, _ = _checkpoint(job.key, progress, self._live().checkpoint_every)
        return NodeJob(job.id, job.status, progress, url, 0 if job.status == "completed" else None)

    async def submit(self, *, command, image, env, resume_from, checkpoint_dir, idempotency_key):  # type: ignore[no-untyped-def]
        node = self._live()
        existing = next((j for j in node.jobs.values() if j.key == idempotency_key), None)
        if existing is None:
            start = float(resume_from.rsplit("/", 1)[1]) if resume_from else 0.0
            existing = FakeJob(
                f"job_{len(node.jobs):016x}",
                idempotency_key,
                self.cloud.clock(),
                start,
                node.job_s,
                node.checkpoint_every,
            )
            node.jobs[existing.id] = existing
            self.cloud.node_submits += 1
            self.cloud.resumed_from.append(start)
        return self._view(existing)

    async def status(self, job_id: str) -> NodeJob | None:
        job = self._live().jobs.get(job_id)
        return None if job is None else self._view(job)

    async def logs(self, job_id: str, after: int) -> tuple[list[str], int]:
        job = self._live().jobs.get(job_id)
        if job is None:
            return [], after
        p = job.progress(self.cloud.clock())
        lines = []
        steps = int(p * 20)
        for i in range(after + 1, steps + 1):
            lines.append(f"PROCURE_PROGRESS {i / 20:.4f}")
            url, saved = _checkpoint(job.key, i / 20, self._live().checkpoint_every)
            if url and abs(saved - i / 20) < 1e-9:
                lines.append(f"PROCURE_CHECKPOINT {url}")
        return lines, max(after, steps)

    async def cancel(self, job_id: str) -> None:
        self._live()

    async def aclose(self) -> None:
        pass


@dataclass
class FakeInstance:
    id: str
    name: str
    offer: Offer
    created: float
    status: str = "booting"
    active_at: float | None = None
    ended_at: float | None = None
    node: FakeNode | None = None


class FakeCloud:
    """One provider's account. `bills`: it has a billing endpoint (False: like Lambda, the
    agent computes the bill). Faults: `capacity` (offer ids refusing launches), `never_boot`,
    `launch_errors` (launches that raise a ProviderError after creating the instance)."""

    def __init__(
        self,
        provider: str,
        offers: list[Offer],
        *,
        boot_s: float = 0.1,
        job_s: float = 2.0,
        bills: bool = True,
    ) -> None:
        self.provider = provider
        self.billing_increment_s = offers[0].billing_increment_s if offers else 1
        self._offers = offers
        self.boot_s = boot_s
        self.job_s = job_s
        self.bills = bills
        self.instances: dict[str, FakeInstance] = {}
        self.nodes: dict[str, FakeNode] = {}
        self.capacity: set[str] = set()
        self.never_boot = False
        self.launch_errors = 0
        self.launches = 0
        self.node_submits = 0
        self.resumed_from: list[float] = []
        self.clock = time.monotonic

    # --- RentalCloud ---
    async def offers(self, *, gpu: str | None = None, gpu_count: int | None = None) -> list[Offer]:
        return [
            o
            for o in self._offers
            if (gpu is None or o.gpu == gpu) and (gpu_count is None or o.gpu_count == gpu_count)
        ]

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        assert spec.name.startswith(LABEL_PREFIX)
        if spec.offer.offer_id in self.capacity:
            raise CapacityError(f"no capacity for {spec.offer.offer_id}")
        self.launches += 1
        inst = FakeInstance(f"{self.provider}-{self.launches}", spec.name, spec.offer, self.clock())
        inst.node = FakeNode(
            f"10.0.{hash(self.provider) % 200}.{next(_ips)}",
            spec.env["GPU_WORKER_TOKEN"],
            self.job_s,
        )
        self.instances[inst.id] = inst
        self.nodes[inst.id] = inst.node
        if self.launch_errors:
            self.launch_errors -= 1
            raise ProviderError("timed out")
        return self._view(inst)

    def _refresh(self, inst: FakeInstance) -> None:
        now = self.clock()
        if inst.status == "booting" and not self.never_boot and now - inst.created >= self.boot_s:
            inst.status, inst.active_at = "active", now

    def _view(self, inst: FakeInstance) -> Instance:
        self._refresh(inst)
        active = inst.status == "active"
        return Instance(
            id=inst.id,
            name=inst.name,
            status=inst.status,  # type: ignore[arg-type]
            instance_type=inst.offer.offer_id,
            region=inst.offer.region,
            ip=inst.node.ip if inst.node else None,
            price_per_hour=inst.offer.price_per_hour,
            node_url=inst.node.url if active and inst.node else None,
            interruptible=inst.offer.interruptible,
            gpu=inst.offer.gpu,
        )

    async def find(self, name: str) -> list[Instance]:
        return [
            self._view(i)
            for i in self.instances.values()
            if i.name == name and i.status != "terminated"
        ]

    async def get(self, instance_id: str) -> Instance | None:
        inst = self.instances.get(instance_id)
        return None if inst is None else self._view(inst)

    async def labelled(self) -> list[Instance]:
        return [
            self._view(i)
            for i in self.instances.values()
            if i.name.startswith(LABEL_PREFIX) and i.status != "terminated"
        ]

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        out = []
        for iid in instance_ids:
            inst = self.instances.get(iid)
            if inst is None:
                continue
            if inst.ended_at is None:
                inst.ended_at = self.clock()
            inst.status = "terminated"
            if inst.node:
                inst.node.die(self.clock())
            out.append(self._view(inst))
        return out

    async def billed(self, instance_id: str) -> int | None:
        if not self.bills:
            return None
        inst = self.instances.get(instance_id)
        return None if inst is None else self.bill(inst)

    async def aclose(self) -> None:
        pass

    # --- admin ---
    def bill(self, inst: FakeInstance) -> int:
        if inst.active_at is None:
            return 0
        end = inst.ended_at if inst.ended_at is not None else self.clock()
        step = inst.offer.billing_increment_s
        seconds = math.ceil(max(end - inst.active_at, 0.0) / step) * step
        return round(seconds * inst.offer.price_per_hour / 3600)

    def total_billed(self) -> int:
        return sum(self.bill(i) for i in self.instances.values())

    def running(self) -> list[FakeInstance]:
        return [i for i in self.instances.values() if i.status != "terminated"]

    def preempt(self, instance_id: str) -> None:
        inst = self.instances[instance_id]
        inst.status, inst.ended_at = "preempted", self.clock()
        if inst.node:
            inst.node.die(self.clock())


def offer(
    provider: str,
    offer_id: str,
    price_usd: float,
    *,
    region: str = "r1",
    spot: bool = False,
    gpu: str = "A100",
    increment: int = 1,
) -> Offer:
    return Offer(
        provider=provider,  # type: ignore[arg-type]
        offer_id=offer_id,
        gpu=gpu,
        gpu_count=1,
        region=region,
        price_per_hour=round(price_usd * 1_000_000),
        interruptible=spot,
        available=3,
        billing_increment_s=increment,
    )


def cloud_vendor(
    vendor_id: str,
    provider: str,
    max_price_usd: float,
    *,
    spot: bool = False,
    reliability: float = 0.95,
) -> Vendor:
    return Vendor(
        vendor_id=vendor_id,
        name=f"{provider} account",
        endpoint=f"cloud:{provider}",
        base_price_per_hour=round(max_price_usd * 1_000_000),
        reliability_score=reliability,
        supported_gpu_types=["A100"],
        kind="cloud",
        cloud=CloudTerms(
            provider=provider,
            gpu="A100",
            max_price_per_hour=round(max_price_usd * 1_000_000),
            spot=spot,
        ),  # type: ignore[arg-type]
    )


def make_deps(store: Store, clouds: dict[str, FakeCloud], **tuning: object) -> AgentDeps:
    keyring = Keyring(Fernet.generate_key())

    def node_client(url: str, token: str) -> FakeNodeClient:
        for cloud in clouds.values():
            if any(n.url == url for n in cloud.nodes.values()):
                return FakeNodeClient(cloud, url, token)
        raise NodeError("no such node")

    defaults: dict[str, object] = {"boot_timeout_s": 5.0, "reserve_ahead_s": 4.0}
    return AgentDeps(
        store=store,
        vendors=VendorClient(keyring),
        account=Account.create(),
        ledger=FacilitatorLedger("http://127.0.0.1:9"),
        clouds=dict(clouds),  # type: ignore[arg-type]
        cloud=CloudTuning(**(defaults | tuning)),  # type: ignore[arg-type]
        keyring=keyring,
        node_client=node_client,  # type: ignore[arg-type]
        cooldown_s=60.0,
    )


def new_store(url: str, vendors: list[Vendor]) -> Store:
    store = open_store(migrated_if_new(url))
    with store.session() as s:
        for v in vendors:
            repo.save_vendor(s, v)
    return store


def new_run(store: Store, budget_usd: float, *, hours: float = 1.0) -> str:
    with store.session() as s:
        run = repo.create_run(
            s,
            user_id="u",
            goal="train",
            budget_total=round(budget_usd * 1_000_000),
            job_spec=JobSpec(gpu_type="A100", hours=hours, checkpoint_every=0.25),
        )
    return run.id


async def drive(deps: AgentDeps, run_id: str, *, timeout_s: float = 30.0, until=None) -> str:  # type: ignore[no-untyped-def]
    """Tick the run until it ends (or `until()` holds); its status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await tick(deps, run_id)
        with deps.store.session() as s:
            run = repo.get_run(s, run_id)
        assert run is not None
        if run.status in TERMINAL_RUN_STATUSES or (until is not None and until()):
            return str(run.status)
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} did not end in {timeout_s}s")


def tmp_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'procure.db'}"
