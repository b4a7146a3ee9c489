"""The mock Vast.ai's state on a simulated clock: machines' asks (offers) whose prices drift,
capacity per ask, instances and their life (created → loading → running; outbid bids paused;
dead hosts offline; destroyed), per-second billing while running, and per-endpoint rate limits
on the wall clock. Thread-safe: the API and the instances' nodes read it from several threads."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from procure.clouds.mockworld.clock import SimClock
from procure.clouds.vast.pacing import INTERVALS_S

MICROS = 1_000_000
DEFAULT_DISK_GB = 8.0  # Vast's search and create, when no disk is given (its spec)


@dataclass
class Machine:
    """One host's ask: `num_gpus` GPUs rented whole, `slots` instances at once."""

    ask_id: int
    gpu_name: str  # Vast's name, e.g. "RTX 4090", "A100 SXM4"
    num_gpus: int
    geolocation: str
    dph: float  # on-demand $/h for the whole bundle, before drift
    slots: int = 2
    bid_ratio: float = 0.45  # min_bid = dph * this
    direct_port_count: int = 100
    gpu_ram_mb: int = 24_564
    nvml_name: str = ""
    power_limit_w: int = 450
    # $/GB a month for the disk an instance is given (Vast's `storage_cost`): a search prices
    # the disk it asks for (`allocated_storage`, 8 GB unless said), a launch bills the disk it
    # asks for. 0 by default: the mock's other figures are the GPU's alone.
    storage_cost: float = 0.0

    def storage_per_hour(self, disk_gb: float) -> float:
        """$/h of `disk_gb` on this host (a month is 720 hours in Vast's prices)."""
        return self.storage_cost * disk_gb / 720

    @property
    def machine_id(self) -> int:
        return 50_000 + self.ask_id % 10_000


def default_machines() -> list[Machine]:
    a100 = {"gpu_ram_mb": 81_920, "power_limit_w": 400, "nvml_name": "NVIDIA A100-SXM4-80GB"}
    h100 = {"gpu_ram_mb": 81_559, "power_limit_w": 700, "nvml_name": "NVIDIA H100 80GB HBM3"}
    rtx = {"nvml_name": "NVIDIA GeForce RTX 4090"}
    return [
        Machine(7_100_001, "RTX 4090", 1, "California, US", 0.40, **rtx),
        Machine(7_100_002, "RTX 4090", 1, "Quebec, CA", 0.36, **rtx),
        Machine(7_100_003, "RTX 4090", 2, "Texas, US", 0.78, **rtx),
        Machine(7_100_004, "A100 SXM4", 1, "Oregon, US", 1.10, **a100),
        Machine(7_100_005, "A100 PCIE", 1, "Hesse, DE", 0.95, **a100),
        Machine(7_100_006, "H100 SXM", 1, "Virginia, US", 2.20, **h100),
        Machine(7_100_007, "H100 SXM", 8, "Virginia, US", 17.20, **h100),
        # No direct port: the node could not be reached (procure's client skips it).
        Machine(7_100_008, "RTX 4090", 1, "Tokyo, JP", 0.30, direct_port_count=0, **rtx),
    ]


@dataclass
class MockVastConfig:
    api_key: str = "mock-vast-key"
    speed: float = 1.0  # simulated seconds per wall second (0: only /admin/clock moves time)
    seed: int = 0  # price drift and outbids are deterministic given the seed
    boot_s: float = 60.0  # created → running (the first 20 % null, then loading: GPU unbilled)
    machines: list[Machine] = field(default_factory=default_machines)
    drift: float = 0.10  # prices move within ± this fraction of the machine's price
    drift_period_s: float = 600.0  # a new price every period (simulated seconds)
    outbid_per_hour: float = 0.2  # hazard of a running bid being outbid (per simulated hour)
    rate_limits_s: dict[str, float] = field(default_factory=lambda: dict(INTERVALS_S))
    rate_scale: float = 1.0  # multiplies rate_limits_s (0: no limits)
    node_token: str | None = None  # nodes' token when a launch's env gives no GPU_WORKER_TOKEN
    nodes: bool = True  # run a GPU node per instance
    host_port: int = 0  # where every node listens on its 127.0.0.N (0: a free port at start)
    first_ip: int = 2
    first_id: int = 30_000_001
    epoch: float = field(default_factory=lambda: float(int(time.time())))  # unix time at sim 0


class Refusal(Exception):
    """A Vast error answer: status and JSON body (or plain text)."""

    def __init__(self, status: int, body: dict[str, Any] | str) -> None:
        super().__init__(str(body))
        self.status, self.body = status, body


def refusal(status: int, error: str, msg: str, **extra: Any) -> Refusal:
    return Refusal(status, {"success": False, "error": error, "msg": msg, **extra})


@dataclass
class MockInstance:
    id: int
    label: str
    machine: Machine
    image: str
    env: dict[str, str]
    onstart: str | None
    runtype: str
    is_bid: bool
    price: float  # $/h billed while running: the bid, or the on-demand price at launch
    min_bid: float
    created_at: float
    running_at: float
    never_boot: bool = False
    disk_gb: float = DEFAULT_DISK_GB  # billed beside the GPU at the host's storage_cost
    preempted_at: float | None = None  # outbid (scheduled or admin) or the host died
    destroyed_at: float | None = None
    ip: str | None = None  # its node's loopback address, once bound
    container_ports: list[int] = field(default_factory=list)

    def ended(self, now: float) -> bool:
        return any(t is not None and t <= now for t in (self.preempted_at, self.destroyed_at))


class MockVastState:
    def __init__(self, config: MockVastConfig) -> None:
        self.config = config
        self.clock = SimClock(config.speed)
        self.instances: dict[int, MockInstance] = {}
        self.lock = threading.RLock()
        self.unknown_status = False
        self.never_boot = False
        self.wrong_ip = False
        self.rate_limited = 0
        self._next_id = config.first_id
        self._last_call: dict[tuple[str, str], float] = {}

    def now(self) -> float:
        return self.clock.now()

    def unix(self, sim_s: float) -> float:
        return self.config.epoch + sim_s

    # --- prices and capacity -----------------------------------------------------------------

    def price(self, machine: Machine, now: float | None = None) -> float:
        """On-demand $/h of the machine now: its price moved by a deterministic drift."""
        now = self.now() if now is None else now
        period = int(now // self.config.drift_period_s) if self.config.drift_period_s > 0 else 0
        wave = random.Random(f"{self.config.seed}:{machine.ask_id}:{period}").uniform(-1, 1)
        return round(machine.dph * (1 + self.config.drift * wave), 6)

    def min_bid(self, machine: Machine, now: float | None = None) -> float:
        return round(self.price(machine, now) * machine.bid_ratio, 6)

    def free(self, machine: Machine, now: float) -> int:
        used = sum(1 for i in self.instances.values() if i.machine is machine and not i.ended(now))
        return machine.slots - used

    def machine(self, ask_id: int) -> Machine | None:
        return next((m for m in self.config.machines if m.ask_id == ask_id), None)

    def set_capacity(self, count: int, ask_id: int | None, gpu: str | None, region: str | None):
        from procure.clouds.vast.wire import canonical_gpu

        with self.lock:
            hit = [
                m
                for m in self.config.machines
                if (ask_id is None or m.ask_id == ask_id)
                and (gpu is None or canonical_gpu(gpu) == canonical_gpu(m.gpu_name))
                and (region is None or m.geolocation == region)
            ]
            for m in hit:
                m.slots = count
            return [m.ask_id for m in hit]

    # --- rate limits (wall clock) ------------------------------------------------------------

    def too_soon(self, endpoint: str, identity: str) -> float | None:
        """The endpoint's threshold (s) when this caller called it less than that ago, else
        None (and the call is counted). Refused calls do not restart the interval."""
        limit = self.config.rate_limits_s.get(endpoint, 0.0) * self.config.rate_scale
        if limit <= 0:
            return None
        with self.lock:
            wall = time.monotonic()
            last = self._last_call.get((endpoint, identity))
            if last is not None and wall - last < limit:
                self.rate_limited += 1
                return limit
            self._last_call[(endpoint, identity)] = wall
            return None

    # --- the API's operations --------------------------------------------------------------

    def create(
        self,
        ask_id: int,
        *,
        label: str,
        image: str,
        env: dict[str, str],
        onstart: str | None,
        runtype: str,
        price: float | None,
        cancel_unavail: bool | None,
        disk_gb: float = DEFAULT_DISK_GB,
    ) -> MockInstance:
        with self.lock:
            now = self.now()
            machine = self.machine(ask_id)
            if machine is None:
                raise refusal(
                    404,
                    "no_such_ask",
                    f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available.",
                    ask_id=ask_id,
                )
            is_bid = price is not None
            if self.free(machine, now) <= 0 and (cancel_unavail or not is_bid):
                raise refusal(
                    410 if cancel_unavail else 404,
                    "no_such_ask",
                    f"error 410/3907: no_such_ask Instance type {ask_id} is no longer available.",
                    ask_id=ask_id,
                )
            min_bid = self.min_bid(machine, now)
            inst = MockInstance(
                id=self._next_id,
                label=label,
                machine=machine,
                image=image,
                env=env,
                onstart=onstart,
                runtype=runtype,
                is_bid=is_bid,
                price=round(price, 6) if price is not None else self.price(machine, now),
                min_bid=min_bid,
                created_at=now,
                running_at=now + self.config.boot_s,
                never_boot=self.never_boot,
                disk_gb=disk_gb,
                container_ports=_ports(env),
            )
            self._next_id += 1
            if is_bid:
                if (price or 0) < min_bid or self.free(machine, now) <= 0:
                    inst.preempted_at = now  # a losing bid: created, paused, never running
                elif self.config.outbid_per_hour > 0:
                    rng = random.Random(f"{self.config.seed}:outbid:{inst.id}")
                    wait = rng.expovariate(self.config.outbid_per_hour / 3600)
                    inst.preempted_at = inst.running_at + wait
            self.instances[inst.id] = inst
            return inst

    def destroy(self, instance_id: int) -> MockInstance:
        with self.lock:
            now = self.now()
            inst = self.instances.get(instance_id)
            if inst is None or (inst.destroyed_at is not None and inst.destroyed_at <= now):
                raise refusal(404, "not_found", "Instance not found")
            inst.destroyed_at = now
            return inst

    def preempt(self, instance_id: int) -> MockInstance:
        """The host died (on-demand: offline) or the bid was outbid (paused: stopped)."""
        with self.lock:
            now = self.now()
            inst = self.instances.get(instance_id)
            if inst is None or inst.ended(now):
                raise refusal(404, "not_found", "Instance not found")
            inst.preempted_at = now
            return inst

    # --- views -----------------------------------------------------------------------------

    def visible(self, now: float) -> list[MockInstance]:
        return [
            i for i in self.instances.values() if i.destroyed_at is None or i.destroyed_at > now
        ]

    def actual_status(self, inst: MockInstance, now: float) -> str | None:
        if inst.destroyed_at is not None and inst.destroyed_at <= now:
            return "destroyed"
        if inst.preempted_at is not None and inst.preempted_at <= now:
            # Outbid bids are paused ("stopped": UNVERIFIED, the docs' likeliest reading);
            # a dead host stops heart-beating, which Vast shows as offline.
            return "stopped" if inst.is_bid else "offline"
        if inst.never_boot or now < inst.running_at:
            return None if now < inst.created_at + 0.2 * self.config.boot_s else "loading"
        return "mystery_state" if self.unknown_status else "running"

    def running_s(self, inst: MockInstance, now: float) -> float:
        if inst.never_boot:
            return 0.0
        end = min(t for t in (now, inst.preempted_at, inst.destroyed_at) if t is not None)
        return max(0.0, end - inst.running_at)

    def hourly(self, inst: MockInstance) -> float:
        """$/h the instance bills while running: its GPU's price and its disk's."""
        return inst.price + inst.machine.storage_per_hour(inst.disk_gb)

    def billed_micros(self, inst: MockInstance, now: float | None = None) -> int:
        """The GPU per second while running (each started second), nothing while loading, paused
        or destroyed; the disk per second from its creation until it is destroyed, whatever its
        state (a stopped or offline instance keeps its disk); bandwidth is not modelled."""
        now = self.now() if now is None else now
        seconds = math.ceil(self.running_s(inst, now) - 1e-9)
        gpu = round(round(inst.price * MICROS) * seconds / 3600)
        end = min(t for t in (now, inst.destroyed_at) if t is not None)
        kept = math.ceil(max(0.0, end - inst.created_at) - 1e-9)
        disk = round(inst.machine.storage_per_hour(inst.disk_gb) * MICROS * kept / 3600)
        return gpu + disk

    def billing(self) -> dict[str, Any]:
        with self.lock:
            now = self.now()
            rows = [
                {
                    "id": str(i.id),
                    "name": i.label,
                    "billedMicroUsd": self.billed_micros(i, now),
                    "status": self.actual_status(i, now) or "created",
                }
                for i in self.instances.values()
            ]
            return {"totalMicroUsd": sum(r["billedMicroUsd"] for r in rows), "instances": rows}


def _ports(env: dict[str, str]) -> list[int]:
    """Container ports mapped by `-p H:C` keys of a launch's env (Vast's dict form)."""
    ports = []
    for key in env:
        parts = key.split()
        if len(parts) == 2 and parts[0] == "-p":
            container = parts[1].split(":")[-1].split("/")[0]
            if container.isdecimal() and 0 < int(container) < 65536:
                ports.append(int(container))
    return ports
