"""The mock cloud's state on a simulated clock: instances and their life (booting → active →
terminating → terminated, or preempted, or unhealthy), capacity and quota, billing, and the
workload the instances' GPUs run (`clouds.mockworld.placement`). Thread-safe: the API and the
simulated nodes read it from different threads. Refusals are `Refusal`s in Lambda's error
vocabulary."""

from __future__ import annotations

import math
import random
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from procure.clouds.lambda_cloud.catalogue import TYPES, MockType, default_capacity
from procure.clouds.lambda_cloud.simnvml import SimGpu
from procure.clouds.mockworld.clock import SimClock
from procure.clouds.mockworld.placement import Cluster
from procure.clouds.mockworld.workload import JobSpec

LIVE = ("booting", "active", "unhealthy")


@dataclass
class MockCloudConfig:
    api_key: str = "mock-lambda-key"
    speed: float = 1.0  # simulated seconds per wall second (0: only admin advances move time)
    boot_s: float = 180.0  # booting → active, simulated seconds
    terminate_s: float = 10.0  # terminating → terminated
    retain_s: float = 600.0  # a terminated or preempted instance stays listed this long
    capacity: dict[str, dict[str, int]] = field(default_factory=default_capacity)
    quota: int = 20  # most instances alive at once (the account's instance limit)
    types: dict[str, MockType] = field(default_factory=lambda: dict(TYPES))
    node_port: int = 9876  # every instance's GPU node answers on <its ip>:<node_port>
    node_token: str | None = None  # the nodes' bearer token; leases (dead-man) need one
    first_ip: int = 2  # nodes get 127.0.0.<first_ip> and up
    api_url: str = ""  # where the nodes' dead-man switch calls terminate (set when served)
    workload: list[JobSpec] = field(default_factory=list)  # placed from simulated time 0
    nodes: bool = True  # run a GPU node per instance (off: the API and the queue only)
    # Prices that move: each type's price is redrawn every `price_period_s` simulated seconds
    # within ±`price_drift` (a fraction) of its list price, deterministically from `seed`. An
    # instance keeps the price of its launch. 0: list prices, as Lambda's mostly are.
    price_drift: float = 0.0
    price_period_s: float = 3600.0
    seed: int = 0
    # Lambda's published limits, on the wall clock (off by default: tests and demos run faster
    # than real time): about 1 request/s, launch 1 per 12 s or 5 a minute. Each is a token
    # bucket (`*_burst` at once, one more every `*_interval_s`). Refused: 429 in Lambda's error
    # envelope, without Retry-After (Lambda documents neither the 429 nor the header).
    rate_limit: bool = False
    request_interval_s: float = 1.0
    request_burst: int = 2
    launch_interval_s: float = 12.0
    launch_burst: int = 5
    # The account's SSH key names at start (`mockkeys`). None: none known, and a launch may
    # name any key (tests, demos); once keys are known, a launch naming another is refused.
    ssh_keys: list[str] | None = None


class Refusal(Exception):
    """A Lambda error answer: HTTP status, code, message, suggestion."""

    def __init__(self, status: int, code: str, message: str, suggestion: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.suggestion = status, code, message, suggestion

    def to_json(self) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message, "suggestion": self.suggestion}
        }


def not_found(what: str) -> Refusal:
    return Refusal(
        404,
        "global/object-does-not-exist",
        f"Specified {what} does not exist.",
        "Check the identifier and try again.",
    )


@dataclass
class MockInstance:
    id: str
    name: str
    type: MockType
    region: str
    ssh_key_names: list[str]
    launched_at: float
    status: str = "booting"
    active_at: float = 0.0
    ended_at: float | None = None  # terminate or preemption
    ip: str | None = None  # set once its node is bound
    node_up: bool = False
    billed_from: float | None = None  # when it passed health checks (became active)
    price_cents: int = 0  # per hour, fixed at launch
    tags: list[dict[str, str]] = field(default_factory=list)
    node_token: str | None = None  # from the launch's user_data; else the config's node_token
    private_ip: str = ""
    jupyter_token: str = field(default_factory=lambda: secrets.token_hex(16))


class MockCloudState:
    def __init__(self, config: MockCloudConfig) -> None:
        self.config = config
        self.clock = SimClock(config.speed)
        self.cluster = Cluster()
        self.instances: dict[str, MockInstance] = {}
        self.billed_micros = 0
        self.launches = 0
        self.refusals: dict[str, int] = {}
        self.lock = threading.RLock()
        self.forgotten_billed = 0  # micro-USD billed for instances no longer listed
        self.never_boot = False  # a fault: instances launched now stay booting forever
        # The account's SSH keys by id ({"id", "name", "public_key"}), as `mockkeys` lists them.
        self.ssh_keys: dict[str, dict[str, str]] = {}
        self.keys_known = config.ssh_keys is not None
        # The account's inbound firewall rules (`mocknet`), replaced whole by each PUT.
        self.firewall_rules: list[dict[str, Any]] = []
        for key_name in config.ssh_keys or []:
            key_id = secrets.token_hex(16)
            public = f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{secrets.token_hex(16)} {key_name}"
            self.ssh_keys[key_id] = {"id": key_id, "name": key_name, "public_key": public}
        if config.workload:
            self.cluster.submit(config.workload, 0.0)

    # --- time ------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.now()

    def step(self) -> float:
        """Play everything up to now: instances that finished booting join the cluster at the
        time they did, jobs arrive and finish, ended instances are forgotten after `retain_s`."""
        with self.lock:
            now = self.now()
            due = sorted(
                (i for i in self.instances.values() if i.status == "booting"),
                key=lambda i: i.active_at,
            )
            for inst in due:
                if inst.active_at > now:
                    break
                inst.status = "active"
                inst.billed_from = inst.active_at
                self.cluster.add_node(inst.id, inst.type.gpus, inst.active_at)
            self.cluster.advance(now)
            for inst in list(self.instances.values()):
                if inst.ended_at is None:
                    continue
                if inst.status == "terminating" and now >= inst.ended_at + self.config.terminate_s:
                    inst.status = "terminated"
                if now >= inst.ended_at + self.config.terminate_s + self.config.retain_s:
                    self.forgotten_billed += self.billed(inst, now)
                    del self.instances[inst.id]
            return now

    # --- the API's operations --------------------------------------------------------------

    def launch(
        self,
        type_name: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        *,
        tags: list[dict[str, str]] | None = None,
        node_token: str | None = None,
    ) -> str:
        with self.lock:
            now = self.step()
            kind = self.config.types.get(type_name)
            if kind is None:
                raise self._refuse(
                    Refusal(
                        404,
                        "global/object-does-not-exist",
                        f"Instance type {type_name!r} does not exist.",
                        "List instance types with GET /api/v1/instance-types.",
                    )
                )
            if region not in self.config.capacity.get(type_name, {}):
                raise self._refuse(
                    Refusal(
                        404,
                        "global/object-does-not-exist",
                        f"Region {region!r} does not exist.",
                        "List regions with GET /api/v1/instance-types.",
                    )
                )
            if len(ssh_key_names) != 1:
                raise self._refuse(
                    Refusal(
                        400,
                        "global/invalid-parameters",
                        "Exactly one SSH key must be specified.",
                        "Pass one name in ssh_key_names.",
                    )
                )
            known = {k["name"] for k in self.ssh_keys.values()}
            if self.keys_known and ssh_key_names[0] not in known:
                raise self._refuse(
                    Refusal(
                        404,
                        "global/object-does-not-exist",
                        f"Specified SSH key {ssh_key_names[0][:64]!r} does not exist.",
                        "List SSH keys with GET /api/v1/ssh-keys, or add one.",
                    )
                )
            if len(self.live()) >= self.config.quota:
                raise self._refuse(
                    Refusal(
                        400,
                        "global/quota-exceeded",
                        "Quota exceeded.",
                        "Contact Support to increase your quota.",
                    )
                )
            if self.free_capacity(type_name, region) <= 0:
                raise self._refuse(
                    Refusal(
                        400,
                        "instance-operations/launch/insufficient-capacity",
                        "Not enough capacity to fulfill launch request.",
                        "Try another region or instance type, or try again later.",
                    )
                )
            inst = MockInstance(
                id=secrets.token_hex(16),
                name=name,
                type=kind,
                region=region,
                ssh_key_names=list(ssh_key_names),
                launched_at=now,
                active_at=math.inf if self.never_boot else now + self.config.boot_s,
                tags=list(tags or []),
                node_token=node_token,
                price_cents=self.price_cents(type_name, now),
            )
            inst.private_ip = (
                f"10.0.{len(self.instances) // 250 % 250}.{len(self.instances) % 250 + 2}"
            )
            self.instances[inst.id] = inst
            self.launches += 1
            return inst.id

    def terminate(self, ids: list[str]) -> list[MockInstance]:
        with self.lock:
            now = self.step()
            missing = [i for i in ids if i not in self.instances]
            if missing:
                raise not_found("instance")
            done = []
            for instance_id in ids:
                inst = self.instances[instance_id]
                if inst.ended_at is None:
                    self._end(inst, "terminating", now)
                done.append(inst)
            return done

    def preempt(self, instance_id: str) -> MockInstance:
        with self.lock:
            inst = self._live(instance_id)
            self._end(inst, "preempted", self.step())
            return inst

    def make_unhealthy(self, instance_id: str) -> MockInstance:
        with self.lock:
            now = self.step()
            inst = self._live(instance_id)
            if inst.status == "booting":
                inst.status = "unhealthy"  # it never came up
            else:
                inst.status = "unhealthy"
                self.cluster.stall_node(inst.id, now)
            return inst

    def _live(self, instance_id: str) -> MockInstance:
        inst = self.instances.get(instance_id)
        if inst is None or inst.ended_at is not None:
            raise not_found("instance")
        return inst

    def _end(self, inst: MockInstance, status: str, now: float) -> None:
        inst.status, inst.ended_at = status, now
        self.cluster.remove_node(inst.id, now)
        self.billed_micros += self._cost(inst, now)

    def _refuse(self, refusal: Refusal) -> Refusal:
        self.refusals[refusal.code] = self.refusals.get(refusal.code, 0) + 1
        return refusal

    # --- views -----------------------------------------------------------------------------

    def live(self) -> list[MockInstance]:
        return [i for i in self.instances.values() if i.status in LIVE]

    def price_cents(self, type_name: str, now: float) -> int:
        """The type's price per hour at simulated time `now` (see `MockCloudConfig.price_drift`)."""
        base = self.config.types[type_name].price_cents_per_hour
        drift = self.config.price_drift
        if drift <= 0:
            return base
        period = int(now // max(self.config.price_period_s, 1.0))
        draw = random.Random(f"{self.config.seed}:{type_name}:{period}").uniform(-1, 1)
        return max(1, round(base * (1 + drift * draw)))

    def free_capacity(self, type_name: str, region: str) -> int:
        used = sum(1 for i in self.live() if i.type.name == type_name and i.region == region)
        return self.config.capacity.get(type_name, {}).get(region, 0) - used

    def gpus(self, instance_id: str) -> list[SimGpu]:
        """What the instance's NVML reports now: its GPUs, busy where a job runs."""
        with self.lock:
            self.step()
            inst = self.instances.get(instance_id)
            if inst is None or inst.ended_at is not None:
                return []
            busy = self.cluster.busy(inst.id) or [False] * inst.type.gpus
            unhealthy = inst.status == "unhealthy"
            return [
                SimGpu(
                    name=inst.type.nvml_name,
                    uuid=f"GPU-{inst.id[:8]}-{index:04d}-{inst.id[8:12]}-{inst.id[12:24]}",
                    memory_total_mb=inst.type.gpu_memory_mb,
                    power_limit_w=inst.type.power_limit_w,
                    busy=b,
                    lost=unhealthy and index == 0,
                )
                for index, b in enumerate(busy)
            ]

    def _cost(self, inst: MockInstance, until: float) -> int:
        # The fleet simulation's conservative cost (`figures`, the fleet benchmark): per second
        # from launch, booting included. What Lambda bills is `billed` (`GET /admin/billing`).
        hours = max(0.0, until - inst.launched_at) / 3600
        return round(inst.price_cents * 10_000 * hours)

    def billed(self, inst: MockInstance, now: float) -> int:
        """Micro-USD Lambda bills for `inst` by its rule: from when it passed its health checks
        (became active) to terminate or preemption, in whole minutes, each minute begun billed
        (Lambda does not document partial-minute rounding; up is the conservative reading), at
        the type's hourly price / 60 per minute, rounded to the micro-dollar. Booting is free."""
        if inst.billed_from is None:
            return 0
        end = inst.ended_at if inst.ended_at is not None else now
        seconds = round(max(0.0, end - inst.billed_from), 3)  # float noise must not add a minute
        minutes = math.ceil(seconds / 60)
        return round(minutes * inst.price_cents * 10_000 / 60)

    def billing(self) -> dict[str, Any]:
        """`GET /admin/billing`: each instance still listed and what Lambda's rule bills for it.
        Instances forgotten after `retain_s` keep their amount in the total."""
        with self.lock:
            now = self.step()
            rows = [
                {
                    "id": i.id,
                    "name": i.name,
                    "billedMicroUsd": self.billed(i, now),
                    "status": i.status,
                }
                for i in self.instances.values()
            ]
            total = self.forgotten_billed + sum(int(r["billedMicroUsd"]) for r in rows)
            return {"totalMicroUsd": total, "instances": rows}

    def figures(self) -> dict[str, Any]:
        """Queue, utilisation and money, for the benchmark and the admin endpoint."""
        with self.lock:
            now = self.step()
            running = sum(self._cost(i, now) for i in self.instances.values() if i.ended_at is None)
            by_status: dict[str, int] = {}
            for inst in self.instances.values():
                by_status[inst.status] = by_status.get(inst.status, 0) + 1
            return {
                **self.cluster.figures(),
                "instances": by_status,
                "launches": self.launches,
                "refusals": dict(self.refusals),
                "billed_usd": round((self.billed_micros + running) / 1e6, 6),
                "hourly_usd": round(sum(i.price_cents for i in self.live()) / 100, 2),
            }
