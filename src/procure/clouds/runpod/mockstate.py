"""The mock RunPod's state on a simulated clock: pods and their life (PROVISIONING → STARTING →
RUNNING; EXITED when the platform stops one; ERROR; deleted), stock per GPU type and data
centre, prices that drift (deterministic by seed), the account balance, rate-limit windows, and
per-second billing. Thread-safe: the API and the simulated nodes read it from several threads.

Billing rule (RunPod leaves it unverified; the spec's createPod example shows `cost` > 0 while
PROVISIONING): a pod is billed per started second at its `cost` from creation, PROVISIONING and
STARTING included, until it is EXITED or deleted; an ERROR pod bills until deleted. `Pod.cost`,
`/v2/billing/pods` and `/admin/billing` all follow this rule (`wire.billed_micros`)."""

from __future__ import annotations

import math
import random
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from procure.clouds.mockworld.clock import SimClock
from procure.clouds.runpod.catalogue import DATA_CENTERS, GPUS, GpuKind, default_capacity
from procure.clouds.runpod.wire import billed_micros

HOLDING = ("PROVISIONING", "STARTING", "RUNNING", "ERROR")  # these hold their GPUs
BILLING = HOLDING
WINDOWS = (("minute", 60), ("hour", 3600), ("day", 86400))
NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)


@dataclass
class RunPodMockConfig:
    api_key: str = "mock-runpod-key"
    speed: float = 1.0  # simulated seconds per wall second (0: only admin advances move time)
    provision_s: float = 20.0  # PROVISIONING → STARTING, simulated seconds
    start_s: float = 40.0  # STARTING → RUNNING
    capacity: dict[str, dict[str, int]] = field(default_factory=default_capacity)
    gpus: dict[str, GpuKind] = field(default_factory=lambda: dict(GPUS))
    price_drift: float = 0.0  # prices move by up to this fraction, hour by simulated hour
    seed: int = 0
    balance_usd: float | None = None  # None: unlimited; else 402 below one hour of the pod
    quotas: dict[str, int] = field(
        default_factory=lambda: {"minute": 600, "hour": 30_000, "day": 500_000}
    )
    node_port: int = 9876  # every pod's node listens on <its ip>:<node_port> (its public port)
    node_token: str | None = None  # a node's token when its pod's env has no GPU_WORKER_TOKEN
    first_ip: int = 2
    nodes: bool = True
    epoch: float = field(default_factory=time.time)  # Unix time of simulated second 0


class Problem(Exception):
    """A RunPod problem+json answer."""

    TITLES: ClassVar[dict[int, str]] = {
        400: "Bad Request",
        401: "Unauthorized",
        402: "Payment Required",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        409: "Conflict",
        422: "Unprocessable Entity",
        429: "Too Many Requests",
        500: "Internal Server Error",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }

    def __init__(
        self,
        status: int,
        detail: str,
        errors: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "title": self.TITLES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        return body


@dataclass
class MockPod:
    id: str
    name: str
    kind: GpuKind
    count: int
    cloud: str
    dc: str
    image: str
    args: str
    env: dict[str, str]
    ports: list[str]
    disk: int
    cost: float  # USD per hour, fixed at creation
    created_at: float
    running_at: float | None  # None: never boots (fault)
    status: str = "PROVISIONING"
    ended_at: float | None = None  # billing stops (EXITED or deleted)
    deleted: bool = False
    ip: str | None = None  # set once its node is bound


def pod_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(14))


class MockRunPodState:
    def __init__(self, config: RunPodMockConfig) -> None:
        self.config = config
        self.clock = SimClock(config.speed)
        self.pods: dict[str, MockPod] = {}  # deleted ones stay here for billing
        self.lock = threading.RLock()
        self.launches = 0
        self.windows: dict[str, tuple[float, int]] = {}
        self.ssh_keys: list[str] = []  # the account's public keys (`PUT /v2/account/ssh-keys`)

    def now(self) -> float:
        return self.clock.now()

    def iso(self, t: float) -> str:
        moment = datetime.fromtimestamp(self.config.epoch + t, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def step(self) -> float:
        with self.lock:
            now, cfg = self.now(), self.config
            for pod in self.pods.values():
                if pod.running_at is None:
                    continue  # never boots (fault)
                if pod.status == "PROVISIONING" and now >= pod.created_at + cfg.provision_s:
                    pod.status = "STARTING"
                if pod.status == "STARTING" and now >= pod.running_at:
                    pod.status = "RUNNING"
            return now

    # --- prices and stock ------------------------------------------------------------------

    def price(self, kind: GpuKind, cloud: str, now: float) -> float:
        base = kind.price(cloud)
        if not self.config.price_drift:
            return base
        hour = int(now // 3600)
        draw = random.Random(f"{self.config.seed}:{kind.id}:{cloud}:{hour}").random()
        return round(base * (1 + self.config.price_drift * (2 * draw - 1)), 2)

    def free(self, gpu_id: str, dc: str) -> int:
        held = sum(
            p.count
            for p in self.pods.values()
            if p.kind.id == gpu_id and p.dc == dc and p.status in HOLDING and not p.deleted
        )
        return self.config.capacity.get(gpu_id, {}).get(dc, 0) - held

    # --- the API's operations --------------------------------------------------------------

    def create(self, body: dict[str, Any], never_boot: bool = False) -> MockPod:
        """A pod from a createPod body already valid against the spec: the handler's rules."""
        with self.lock:
            now = self.step()
            if "templateId" in body:
                raise Problem(404, "template not found")
            if ("gpu" in body) == ("cpu" in body):
                raise Problem(400, "exactly one of gpu or cpu must be set")
            if "cpu" in body:
                raise Problem(400, "CPU pods are not offered in this data center")
            kind = self.config.gpus.get(body["gpu"]["id"])
            count = int(body["gpu"].get("count", 1))
            cloud = body.get("cloud", "SECURE")
            if kind is None:
                raise Problem(400, f"GPU type {body['gpu']['id'][:100]!r} is not available")
            if count > kind.most(cloud):
                raise Problem(400, f"at most {kind.most(cloud)} GPUs of this type per pod")
            wanted = body.get("dataCenterIds") or list(self.config.capacity.get(kind.id, {}))
            unknown = [d for d in wanted if d not in DATA_CENTERS]
            if unknown:
                raise Problem(400, f"unknown data center {unknown[0][:100]!r}")
            cost = round(self.price(kind, cloud, now) * count, 4)
            balance = self.balance_left(now)
            if balance is not None and balance < cost:  # one hour of credits to deploy
                raise Problem(402, "insufficient balance: at least one hour of credits is needed")
            places = [d for d in wanted if self.free(kind.id, d) >= count]
            if not places:
                raise Problem(400, NO_CAPACITY)
            dc = places[0] if body.get("dataCenterIds") else max(places, key=self._free_of(kind))
            boot = self.config.provision_s + self.config.start_s
            pod = MockPod(
                id=pod_id(),
                name=body["name"],
                kind=kind,
                count=count,
                cloud=cloud,
                dc=dc,
                image=body["image"],
                args=body.get("args", ""),
                env=dict(body.get("env") or {}),
                ports=list(body.get("ports") or []),
                disk=int(body.get("disk", 50)),
                cost=cost,
                created_at=now,
                running_at=None if never_boot else now + boot,
            )
            self.pods[pod.id] = pod
            self.launches += 1
            return pod

    def _free_of(self, kind: GpuKind) -> Any:
        return lambda dc: self.free(kind.id, dc)

    def visible(self, pod_id: str) -> MockPod:
        pod = self.pods.get(pod_id)
        if pod is None or pod.deleted:
            raise Problem(404, "pod not found")
        return pod

    def delete(self, pod_id: str) -> MockPod:
        with self.lock:
            now = self.step()
            pod = self.visible(pod_id)
            pod.deleted = True
            if pod.ended_at is None:
                pod.ended_at = now
            pod.status = "TERMINATED"
            return pod

    def preempt(self, pod_id: str) -> MockPod:
        """The platform stops the pod (a host that dies): EXITED, its GPUs and billing end."""
        with self.lock:
            now = self.step()
            pod = self.visible(pod_id)
            if pod.ended_at is None:
                pod.status, pod.ended_at = "EXITED", now
            return pod

    def make_error(self, pod_id: str) -> MockPod:
        with self.lock:
            self.step()
            pod = self.visible(pod_id)
            if pod.ended_at is None:
                pod.status = "ERROR"
            return pod

    # --- money -----------------------------------------------------------------------------

    def billed(self, pod: MockPod, until: float | None = None) -> int:
        """Micro-USD billed for `pod` up to simulated time `until` (default: now)."""
        until = self.now() if until is None else until
        end = until if pod.ended_at is None else min(until, pod.ended_at)
        return billed_micros(pod.cost, end - pod.created_at) if end > pod.created_at else 0

    def total_billed(self, now: float) -> int:
        return sum(self.billed(p, now) for p in self.pods.values())

    def balance_left(self, now: float) -> float | None:
        if self.config.balance_usd is None:
            return None
        return self.config.balance_usd - self.total_billed(now) / 1e6

    def billing(self) -> dict[str, Any]:
        """`/admin/billing`: what this account has been billed, by the rule above."""
        with self.lock:
            now = self.step()
            rows = [
                {
                    "id": p.id,
                    "name": p.name,
                    "billedMicroUsd": self.billed(p, now),
                    "status": p.status,
                }
                for p in self.pods.values()
            ]
            return {"totalMicroUsd": sum(r["billedMicroUsd"] for r in rows), "instances": rows}

    # --- rate limits (on the simulated clock, fixed windows) -------------------------------

    def admit(self) -> dict[str, str]:
        """Count one authenticated request: its RateLimit headers, or a 429 Problem."""
        with self.lock:
            now = self.now()
            state: list[tuple[str, int, int, int]] = []  # name, quota, used, reset in s
            for name, length in WINDOWS:
                start, used = self.windows.get(name, (now, 0))
                if now >= start + length:
                    start, used = now, 0
                self.windows[name] = (start, used)
                reset = max(1, math.ceil(start + length - now))
                state.append((name, self.config.quotas.get(name, 10**9), used, reset))
            lengths = dict(WINDOWS)
            policy = ", ".join(f'"{n}";q={q};w={lengths[n]}' for n, q, _, _ in state)
            over = [s for s in state if s[2] >= s[1]]
            if over:
                name, _, _, reset = over[-1]
                live = ", ".join(f'"{n}";r={max(0, q - u)};t={t}' for n, q, u, t in state)
                headers = {"Retry-After": str(reset), "RateLimit": live}
                headers["RateLimit-Policy"] = policy
                raise Problem(429, f"rate limit exceeded for the {name} window", headers=headers)
            for name, _, used, _ in state:
                self.windows[name] = (self.windows[name][0], used + 1)
            live = ", ".join(f'"{n}";r={max(0, q - u - 1)};t={t}' for n, q, u, t in state)
            return {"RateLimit": live, "RateLimit-Policy": policy}
