"""What procure's fleet policy reads in the real controller: a `FleetSignal` built from the live
views, the cloud's catalogue and billing increment, observed boots, and the operator's job queue
(an optional URL, read bounded: any failure is an unknown queue and a recorded error)."""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx

from procure.bounds import UnsafeInput, clip, loads
from procure.clouds.base import CloudError, InstanceType
from procure.fleet.context import FleetContext
from procure.fleet.monitor import InstanceView
from procure.fleet.policies import FleetSignal, ProcurePolicy
from procure.fleet.policy import PROVISION, Proposal, snapshot
from procure.httpbounds import AnswerRejected, DeadlineExceeded, bounded_client
from procure.store import fleet_repo
from procure.store.fleet_repo import RUNNING_STATUSES

log = logging.getLogger(__name__)
MAX_QUEUE_BYTES = 1_000_000  # ~20,000 jobs of JSON: far more than a fleet's queue
MAX_JOBS = 10_000
MAX_JOB_GPUS = 1024
MAX_WAIT_S = 366 * 24 * 3600.0
DEFAULT_BOOT_S = FleetSignal.__dataclass_fields__["boot_s"].default
BOOTS_KEPT = 10  # the boot time is the mean of the last few observed


class QueueError(Exception):
    """The queue source answered, but not with a queue."""


def parse_queue(body: Any) -> tuple[tuple[int, float], ...]:
    """`{"jobs": [{"gpus": 2, "waitingS": 130}, ...]}` → ((2, 130.0), ...), in the scheduler's
    order. One malformed job refuses the whole answer: a launch is never bought on garbage."""
    jobs = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(jobs, list):
        raise QueueError('the answer has no "jobs" list')
    if len(jobs) > MAX_JOBS:
        raise QueueError(f"{len(jobs):,} jobs, more than the {MAX_JOBS:,} allowed")
    out: list[tuple[int, float]] = []
    for n, job in enumerate(jobs):
        gpus = job.get("gpus") if isinstance(job, dict) else None
        waited = job.get("waitingS", 0) if isinstance(job, dict) else None
        if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_JOB_GPUS:
            raise QueueError(f"job {n}: gpus must be a whole number from 1 to {MAX_JOB_GPUS}")
        if (
            isinstance(waited, bool)
            or not isinstance(waited, int | float)
            # Compared before isfinite: an integer beyond a float's range would raise there.
            or not 0 <= waited <= MAX_WAIT_S
            or not math.isfinite(waited)
        ):
            raise QueueError(f"job {n}: waitingS must be seconds from 0 to {MAX_WAIT_S:g}")
        out.append((gpus, float(waited)))
    return tuple(out)


async def read_queue(
    url: str, token: str | None, timeout_s: float
) -> tuple[tuple[tuple[int, float], ...], str | None]:
    """The queued jobs and None, or an empty queue and why (never raises but on cancel)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = bounded_client(deadline_s=timeout_s, max_bytes=MAX_QUEUE_BYTES)
    try:
        response = await client.get(url, headers=headers)
        if response.status_code != 200:
            raise QueueError(f"HTTP {response.status_code}")
        return parse_queue(loads(response.content, max_bytes=MAX_QUEUE_BYTES)), None
    except (httpx.HTTPError, UnsafeInput, QueueError) as exc:
        # httpx's own messages may carry the URL, which may carry a secret: ours never do.
        ours = QueueError | UnsafeInput | AnswerRejected | DeadlineExceeded
        detail = str(exc) if isinstance(exc, ours) else type(exc).__name__
        return (), clip(f"queue: {detail}", 300)
    finally:
        await client.aclose()


def busy_gpus(v: InstanceView) -> int:
    """GPUs busy on an active node, from its latest utilisation (98 % per busy GPU, as NVML
    reports a GPU running a job)."""
    util = v.latest.gpu_util if v.latest and v.latest.gpu_util is not None else 0.0
    return min(v.instance.gpus, round(util / 98.0 * v.instance.gpus))


def build(
    *,
    now: datetime,
    views: Sequence[InstanceView],
    types: Sequence[InstanceType],
    default_type: str,
    billing_increment_s: float,
    bills_boot: bool,
    boot_s: float,
    last_provision_at: datetime | None,
    queued: Sequence[tuple[int, float]] = (),
    queue_known: bool = False,
) -> FleetSignal:
    """The signal from what a controller knows. Without a queue read (none configured, or the
    read failed: `queue_known` False) the policy only lets idle instances go at the end of their
    paid increment (and keeps the minimum). Free GPUs are estimated from utilisation, never
    the scheduler's placement (`placement_known` False): no job is moved on them."""
    kind = next((t for t in types if t.name == default_type), None)
    active = [v for v in views if v.instance.status == "active" and v.latest is not None]
    return FleetSignal(
        now=now,
        queued_jobs=len(queued),
        queued_gpus=sum(g for g, _ in queued),
        oldest_wait_s=max((w for _, w in queued), default=0.0),
        busy_gpus=sum(busy_gpus(v) for v in active),
        gpus_per_instance=kind.gpus if kind else 1,
        boot_s=boot_s,
        regions=tuple(kind.regions_with_capacity) if kind else (),
        last_provision_at=last_provision_at,
        largest_queued_gpus=max((g for g, _ in queued), default=0),
        offers=tuple(types),
        billing_increment_s=float(max(1.0, billing_increment_s)),
        queued=tuple(queued),
        free_gpus=tuple((v.id, v.instance.gpus - busy_gpus(v)) for v in active),
        bills_boot=bills_boot,
        queue_known=queue_known,
        placement_known=False,
    )


@dataclass
class ControllerState:
    """What the controller learns across scans for procure's policy: the policy itself (it
    tracks billing starts), and the boot times it has seen."""

    policy: ProcurePolicy
    booting: dict[str, datetime] = field(default_factory=dict)  # id -> first seen booting at
    boots: deque[float] = field(default_factory=lambda: deque(maxlen=BOOTS_KEPT))

    def observe(self, views: Sequence[InstanceView], now: datetime) -> None:
        """An instance seen booting, then active: its boot took from its launch (first seen)
        to about now."""
        for v in views:
            if v.instance.status == "booting":
                self.booting.setdefault(v.id, v.instance.first_seen_at)
            elif v.id in self.booting:
                began = self.booting.pop(v.id)
                if v.instance.status == "active":
                    self.boots.append(max(0.0, (now - began).total_seconds()))
        live = {v.id for v in views if v.instance.status in RUNNING_STATUSES}
        for gone in set(self.booting) - live:
            self.booting.pop(gone)

    @property
    def boot_s(self) -> float:
        return sum(self.boots) / len(self.boots) if self.boots else DEFAULT_BOOT_S


_STATES: dict[int, ControllerState] = {}


def state_for(ctx: FleetContext) -> ControllerState:
    """This controller's state, made on its first scan and dropped with its context."""
    key = id(ctx)
    found = _STATES.get(key)
    if found is None:
        # Moving jobs between nodes needs the scheduler's help, which a queue URL does not
        # give: the real controller never replaces a busy node (`migrate_after_s` infinite).
        target = ctx.cfg.queue_wait_target_min * 60
        found = ControllerState(ProcurePolicy(target_wait_s=target, migrate_after_s=math.inf))
        _STATES[key] = found
        weakref.finalize(ctx, _STATES.pop, key, None)
    return found


# The cloud clients already warned of for not saying whether they bill the boot (once each).
_UNSAID_BOOT: set[str] = set()


def cloud_billing(cloud: Any) -> tuple[float, bool]:
    """(billing increment in seconds, whether the boot is billed) of a fleet's cloud, as its
    client says (`Cloud.billing_increment_s`, `Cloud.bills_boot`): Lambda's bills by the minute
    from the end of the boot; RunPod's and Vast.ai's by the second from the launch; any other
    cloud as it says, never by its provider's name. A cloud that does not give an increment:
    per second. One that does not say whether it bills the boot is taken to (and warned of,
    once): taken not to, a boot already billed by the hour would be called off, its paid hour
    thrown away, and the instance kept past the hour its bill really ends."""
    increment = getattr(cloud, "billing_increment_s", 1)
    if isinstance(increment, bool) or not isinstance(increment, int | float):
        increment = 1
    if not math.isfinite(increment):
        increment = 1
    bills_boot = getattr(cloud, "bills_boot", None)
    if not isinstance(bills_boot, bool):
        kind = cloud if isinstance(cloud, type) else type(cloud)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if name not in _UNSAID_BOOT:
            _UNSAID_BOOT.add(name)
            log.warning(
                "cloud client %s does not say whether its cloud bills the boot (bills_boot): "
                "the fleet plans as if it does",
                name,
            )
        bills_boot = True
    return float(max(1, increment)), bills_boot


async def decide(
    ctx: FleetContext, views: Sequence[InstanceView], now: datetime, price: int | None
) -> tuple[list[Proposal], str | None]:
    """procure's policy's proposals for this scan, and what went wrong reading the queue or
    the catalogue (the policy then decides on an unknown queue, or the catalogue last read)."""
    state = state_for(ctx)
    state.observe(views, now)
    cfg, error = ctx.cfg, None
    queued: tuple[tuple[int, float], ...] = ()
    if cfg.queue_url is not None:
        token = cfg.queue_token.get_secret_value() if cfg.queue_token else None
        queued, error = await read_queue(
            cfg.queue_url.get_secret_value(), token, cfg.queue_timeout_s
        )
    # A failed read is not an empty queue: a boot is never called off for lack of its job.
    queue_known = cfg.queue_url is not None and error is None
    if queued:  # a launch may follow: which types have capacity now, not when first listed
        try:
            ctx.types = {t.name: t for t in await ctx.cloud.instance_types()}
        except CloudError as exc:
            error = error or clip(f"instance types: {type(exc).__name__}: {exc}", 300)
    with ctx.store.session() as s:
        last_up = fleet_repo.last_acted(s, "provision_instance")
    increment, bills_boot = cloud_billing(ctx.cloud)
    signal = build(
        now=now,
        views=views,
        types=list(ctx.types.values()),
        default_type=cfg.default_instance_type,
        billing_increment_s=increment,
        bills_boot=bills_boot,
        boot_s=state.boot_s,
        last_provision_at=last_up,
        queued=queued,
        queue_known=queue_known,
    )
    if error:
        log.warning("procure policy: %s (deciding without it)", error)
    # The audit trail keeps what each decision was made on, as the seed's rule does.
    before = snapshot(views) | {
        "policy": "procure",
        "queued_jobs": signal.queued_jobs,
        "queued_gpus": signal.queued_gpus,
        "oldest_wait_s": round(signal.oldest_wait_s),
        "billing_increment_s": signal.billing_increment_s,
        "queue_known": signal.queue_known,
    }
    proposals = []
    for p in state.policy(views, cfg, price, signal):
        if p.action_type == PROVISION and p.instance_type not in ctx.types:
            # Not in the catalogue (the policy falls back to the configured type at price 0):
            # its price is unknown, and the rails' spend checks need one. Not launched.
            log.warning("procure policy: %s is not in the cloud's catalogue", p.instance_type)
            continue
        proposals.append(p)
    return [
        dataclasses.replace(p, metrics_before=p.metrics_before or before) for p in proposals
    ], error
