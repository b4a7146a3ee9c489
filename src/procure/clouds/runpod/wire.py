"""RunPod REST v2's wire format, read defensively: catalog GPU types become `Offer`s, pods become
`Instance`s, billing records micro-USD, problem+json answers the errors of `clouds.base`.
Anything unexpected is the provider's trouble (`ProviderError`), never a crash."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from procure.bounds import clip
from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    InstanceStatus,
    Offer,
    ProviderError,
    QuotaError,
    RateLimited,
    http_url,
)

log = logging.getLogger(__name__)
MICROS = 1_000_000
BILLING_INCREMENT_S = 1  # RunPod bills pods per second (docs.runpod.io/pods/pricing)
CLOUDS = ("SECURE", "COMMUNITY")
# How many pods one availability level stands for (RunPod only gives a level, not a count).
AVAILABLE = {"NONE": 0, "LOW": 1, "MEDIUM": 3, "HIGH": 8}
STATUS: dict[str, InstanceStatus] = {
    "PROVISIONING": "booting",
    "STARTING": "booting",
    "RUNNING": "active",
    # RunPod REST v2 has no interruptible pods: a pod that procure never stopped but that shows
    # EXITED was stopped by the platform (lost host, balance) or its container ended.
    "EXITED": "preempted",
    "ERROR": "unhealthy",
    "TERMINATED": "terminated",
}
MAX_PODS = 10_000


def billed_micros(rate_usd_per_hour: float, seconds: float) -> int:
    """RunPod's per-second rule as the mock bills it: every started second is billed, at the
    pod's hourly rate, rounded to the micro-USD."""
    whole = max(0, math.ceil(seconds - 1e-6))
    return round(whole * round(rate_usd_per_hour * MICROS) / 3600)


_GPU_VENDORS = ("NVIDIA", "GEFORCE", "AMD", "TESLA", "INSTINCT")


def canonical_gpu(gpu_id: str) -> str:
    """RunPod's GPU type id ("NVIDIA GeForce RTX 4090", "NVIDIA A100 80GB PCIe",
    "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB", "AMD Instinct MI300X OAM") as procure's
    canonical model ("RTX4090", "A100", "A100", "V100", "MI300X"): some ids join the form factor
    to the model with hyphens, some put a brand before it."""
    words = [w for w in re.split(r"[\s\-]+", gpu_id.upper()) if w and w not in _GPU_VENDORS]
    if not words:
        return ""
    if words[0] == "RTX" and len(words) > 1:
        if words[1] == "PRO" and len(words) > 2:  # "RTX PRO 6000 Blackwell ...": a model each
            return "RTXPRO" + words[2]
        return words[1] if words[1].startswith("A") else "RTX" + words[1]
    return words[0]


def offer_id(cloud: str, gpu_id: str) -> str:
    """What `launch` needs of an offer: the cloud tier and the GPU type id."""
    return f"{cloud}:{gpu_id}"


def parse_offer_id(value: str) -> tuple[str, str]:
    cloud, sep, gpu_id = value.partition(":")
    if sep and cloud in CLOUDS and gpu_id:
        return cloud, gpu_id
    return "SECURE", value  # a bare GPU type id: RunPod's default tier


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Price(_Loose):
    secure: float = Field(ge=0, le=10_000)
    community: float = Field(ge=0, le=10_000)


class _DataCenter(_Loose):
    id: str = Field(min_length=1, max_length=200)
    availability: str = Field(max_length=20)


class _GpuType(_Loose):
    id: str = Field(min_length=1, max_length=200)
    name: str = Field("", max_length=200)
    secure: bool = False
    community: bool = False
    price: _Price
    dataCenters: list[_DataCenter] = Field(default_factory=list, max_length=1000)


class _PodGpu(_Loose):
    id: str = Field(max_length=200)
    count: int = Field(1, ge=1, le=1024)


class _Port(_Loose):
    private: int | None = Field(None, ge=0, le=1_000_000)
    public: int | None = Field(None, ge=0, le=1_000_000)
    type: str | None = Field(None, max_length=20)
    ip: str | None = Field(None, max_length=100)


class _Runtime(_Loose):
    ports: list[_Port] | None = Field(None, max_length=1000)


MAX_POD_ID = 100
"""What the store keeps of an instance id: a longer one, cut, would name no pod (looked gone,
$0 booked, never terminated), so it is refused here."""


class _Pod(_Loose):
    id: str = Field(min_length=1, max_length=MAX_POD_ID)
    name: str = Field("", max_length=1000)
    status: str = Field(max_length=40)
    cost: float = Field(0.0, ge=0, le=100_000)
    cloud: str = Field("SECURE", max_length=20)
    dataCenterId: str | None = Field(None, max_length=200)
    gpu: _PodGpu | None = None
    ports: list[str] | None = Field(None, max_length=1000)
    runtime: _Runtime | None = None


class _Problem(_Loose):
    title: str = Field("", max_length=1000)
    status: int | None = None
    detail: str = Field("", max_length=10_000)
    errors: list[str] = Field(default_factory=list, max_length=1000)


class _BillingRecord(_Loose):
    podId: str = Field(max_length=200)
    totalAmount: float = Field(ge=0, le=1e9)


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return clip(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}", 200)


def offers(body: Any, cloud: str, gpu_count: int = 1) -> list[Offer]:
    """The offers of one tier in a `listGpuTypes` answer (with include=AVAILABILITY): one per
    (GPU type, data centre) that has stock, priced per GPU times count."""
    items = body.get("gpus") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) > 10_000:
        raise ProviderError("RunPod's GPU catalog answer has no list of gpus")
    found: list[Offer] = []
    for raw in items:
        try:
            gpu = _GpuType.model_validate(raw)
        except ValidationError as exc:
            raise ProviderError(f"RunPod's GPU catalog is malformed: {_first(exc)}") from None
        if not (gpu.secure if cloud == "SECURE" else gpu.community):
            continue
        rate = gpu.price.secure if cloud == "SECURE" else gpu.price.community
        for dc in gpu.dataCenters:
            available = AVAILABLE.get(dc.availability, 0)
            if available <= 0:
                continue
            found.append(
                Offer(
                    provider="runpod",
                    offer_id=offer_id(cloud, gpu.id),
                    gpu=canonical_gpu(gpu.id),
                    gpu_count=gpu_count,
                    region=dc.id,
                    price_per_hour=round(rate * MICROS) * gpu_count,
                    interruptible=False,
                    available=available,
                    billing_increment_s=BILLING_INCREMENT_S,
                )
            )
    return found


def node_port_of(ports: list[str] | None, default: int) -> int:
    """The pod's first `<n>/tcp` port: procure launches its node's port first."""
    for entry in ports or []:
        number, _, proto = entry.partition("/")
        if proto == "tcp" and number.isdecimal():
            return int(number)
    return default


def instance(raw: Any, node_port: int) -> Instance:
    try:
        pod = _Pod.model_validate(raw)
    except ValidationError as exc:
        raise ProviderError(f"RunPod's pod is malformed: {_first(exc)}") from None
    status = STATUS.get(pod.status)
    if status is None:
        # A status RunPod added: never guessed gone (nor does one pod stop the whole listing, and
        # with it every find and sweep of the account); with a port mapped, its node tells
        # whether it works (`active`), as for Vast.ai; without one it is `unhealthy`.
        log.warning("RunPod pod %s has an unknown status %r", pod.id, clip(pod.status, 40))
    ip = node_url = None
    if status in ("active", None) and pod.runtime and pod.runtime.ports:
        private = node_port_of(pod.ports, node_port)
        for port in pod.runtime.ports:
            if port.private == private and port.ip and port.public:
                # An IPv6 address bracketed: unbracketed, it was no URL at all.
                ip, node_url = port.ip, http_url(port.ip, port.public)
                break
    if status is None:
        status = "active" if node_url else "unhealthy"
    gpu_id = pod.gpu.id if pod.gpu else ""
    cloud = pod.cloud if pod.cloud in CLOUDS else "SECURE"
    return Instance(
        id=pod.id,
        name=pod.name,
        status=status,
        instance_type=offer_id(cloud, gpu_id),
        region=pod.dataCenterId or "",
        ip=ip,
        price_per_hour=round(pod.cost * MICROS),
        gpus=pod.gpu.count if pod.gpu else 0,
        node_url=node_url,
        interruptible=False,
        gpu=canonical_gpu(gpu_id),
        # Stopped, by the operator or the platform (v2 does not say which): its disk is kept and
        # it resumes on its host (`start`, the spec's `actions`).
        resumable=pod.status == "EXITED",
    )


def pods(body: Any, node_port: int) -> list[Instance]:
    items = body.get("pods") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) > MAX_PODS:
        raise ProviderError("RunPod's pods answer has no list of pods")
    return [instance(p, node_port) for p in items]


def billed(body: Any, pod_id: str) -> int:
    """Micro-USD billed for `pod_id`: the sum of its `listPodBilling` records."""
    items = body.get("records") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) > 100_000:
        raise ProviderError("RunPod's billing answer has no records")
    try:
        records = [_BillingRecord.model_validate(r) for r in items]
    except ValidationError as exc:
        raise ProviderError(f"RunPod's billing record is malformed: {_first(exc)}") from None
    return round(sum(r.totalAmount for r in records if r.podId == pod_id) * MICROS)


def problem(body: Any) -> tuple[str, list[str]]:
    """(detail, errors) of a problem+json answer; ("", []) when `body` is not one."""
    try:
        found = _Problem.model_validate(body)
    except ValidationError:
        return "", []
    return clip(found.detail or found.title, 300), [clip(e, 200) for e in found.errors[:5]]


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (RunPod sends integer seconds); None when absent or unreadable."""
    if value is None or not value.strip().isdecimal():
        return None
    return float(min(int(value.strip()), 3600))


def exhausted_for(rate_limit: str | None) -> float | None:
    """Seconds until a window whose remaining count is 0 resets, from the `RateLimit` header
    (`"minute";r=0;t=12, ...`); None when every window has requests left."""
    wait = None
    for member in (rate_limit or "")[:1000].split(","):
        params = dict(p.strip().partition("=")[::2] for p in member.split(";")[1:])
        if params.get("r") == "0" and params.get("t", "").isdecimal():
            wait = max(wait or 0.0, float(min(int(params["t"]), 3600)))
    return wait


def error_for(status: int, body: Any, what: str, *, create: bool, after: str | None) -> CloudError:
    """The exception for a failed call, by RunPod's createPod policy: 422 never retry, 400 try
    the next candidate (rule or capacity), 403 too (the account cannot use that pool), 402 stop
    (balance), 401 (and 403 elsewhere) the key, 429 wait, 5xx retry."""
    detail, errors = problem(body)
    text = f"{what}: RunPod answered {status}" + (f": {detail}" if detail else "")
    if errors:
        text += " (" + "; ".join(errors) + ")"
    if status == 403 and create:
        return CapacityError(text)
    if status in (401, 403):
        return AuthError(f"{what}: RunPod refused the API key ({status} {detail or 'denied'})")
    if status == 429:
        return RateLimited(text, retry_after(after))
    if status == 402:
        return QuotaError(text)
    if status == 400 and create:
        return CapacityError(text)
    if status >= 500 or not detail:
        return ProviderError(text if detail else f"{what}: RunPod answered {status} without JSON")
    return CloudError(text)  # 400 elsewhere, 404, 409, 422: fix the request, never retry
