"""Lambda Cloud's wire format, read defensively: answers become `clouds.base` types, error
envelopes become its exceptions. Anything unexpected is the provider's trouble, never a crash."""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from procure.bounds import clip
from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    InstanceStatus,
    InstanceType,
    ProviderError,
    QuotaError,
    RateLimited,
    http_url,
)

log = logging.getLogger(__name__)
CENTS = 10_000  # micro-USD per cent
STATUSES = set(get_args(InstanceStatus))
BILLING_INCREMENT_S = 60
_TYPE_NAME = re.compile(r"^gpu_(\d+)x_([a-z0-9]+)")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Specs(_Loose):
    gpus: int = Field(ge=0, le=1024)


class _Type(_Loose):
    name: str = Field(max_length=200)
    description: str = Field("", max_length=1000)
    price_cents_per_hour: int = Field(ge=0, le=10**9)
    specs: _Specs


class _Region(_Loose):
    name: str = Field(max_length=200)


class _TypeItem(_Loose):
    instance_type: _Type
    regions_with_capacity_available: list[_Region] = Field(max_length=1000)


MAX_ID = 100
"""What the store keeps of an instance id: a longer one, cut, would name no instance (looked
gone, $0 booked, never terminated), so it is refused here."""


class _Instance(_Loose):
    id: str = Field(min_length=1, max_length=MAX_ID)
    name: str | None = Field(None, max_length=200)
    ip: str | None = Field(None, max_length=100)
    status: str
    region: _Region
    instance_type: _Type


class _ErrorBody(_Loose):
    code: str = Field(max_length=200)
    message: str = Field("", max_length=10_000)
    suggestion: str | None = Field(None, max_length=10_000)


def _data(body: Any, what: str) -> Any:
    if not isinstance(body, dict) or "data" not in body:
        raise ProviderError(f"Lambda answered {what} without its `data`")
    return body["data"]


def instance_types(body: Any) -> list[InstanceType]:
    data = _data(body, "instance-types")
    if not isinstance(data, dict) or len(data) > 1000:
        raise ProviderError("Lambda's instance-types answer is not a map of types")
    try:
        items = [_TypeItem.model_validate(v) for v in data.values()]
    except ValidationError as exc:
        raise ProviderError(f"Lambda's instance-types answer is malformed: {_first(exc)}") from None
    return [
        InstanceType(
            name=i.instance_type.name,
            description=i.instance_type.description,
            gpus=i.instance_type.specs.gpus,
            price_per_hour=i.instance_type.price_cents_per_hour * CENTS,
            regions_with_capacity=[r.name for r in i.regions_with_capacity_available],
        )
        for i in items
    ]


def gpu_of(type_name: str) -> str:
    """The canonical GPU model of a Lambda instance type: gpu_1x_a100 → A100, gpu_8x_h100_sxm5
    → H100, gpu_1x_gh200 → GH200; "" for a type that is not named so (cpu_4x_general)."""
    found = _TYPE_NAME.match(type_name)
    return found.group(2).upper() if found else ""


def address(ip: str | None) -> str | None:
    """`ip` when it is an IP address and nothing else (no port, path or host name), else None:
    an address taken from the cloud's answer must not steer a node's token anywhere else."""
    if not ip:
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def node_url(ip: str | None, port: int) -> str | None:
    checked = address(ip)
    if checked is None:
        return None
    return http_url(checked, port)


def cost_micros(price_per_hour: int, billed_s: float) -> int:
    """What Lambda bills (micro-USD) for `billed_s` seconds of an instance at `price_per_hour`
    micro-USD: whole minutes, each minute begun counted, at the hourly price / 60. Billing runs
    from when the instance passes its health checks (shows `active`) to its terminate."""
    seconds = round(max(0.0, billed_s), 3)  # float noise must not add a minute
    return round(math.ceil(seconds / BILLING_INCREMENT_S) * price_per_hour / 60)


def instance(raw: Any, node_port: int | None = None) -> Instance:
    try:
        i = _Instance.model_validate(raw)
    except ValidationError as exc:
        raise ProviderError(f"Lambda's instance is malformed: {_first(exc)}") from None
    status = i.status
    ip = address(i.ip)
    if status not in STATUSES:
        # A status Lambda added: never guessed gone (nor does one instance stop the whole
        # listing, and with it every find and sweep of the account); with an address its node
        # tells whether it works (`active`), as for Vast.ai; without one it is `unhealthy`.
        log.warning("Lambda instance %s has an unknown status %r", i.id, clip(status, 40))
        status = "active" if ip is not None and node_port is not None else "unhealthy"
    up = status == "active" and node_port is not None
    return Instance(
        id=i.id,
        name=i.name,
        status=status,  # type: ignore[arg-type]
        instance_type=i.instance_type.name,
        region=i.region.name,
        ip=ip,
        price_per_hour=i.instance_type.price_cents_per_hour * CENTS,
        gpus=i.instance_type.specs.gpus,
        node_url=node_url(ip, node_port) if up and node_port is not None else None,
        gpu=gpu_of(i.instance_type.name),
    )


def instances(body: Any, node_port: int | None = None) -> list[Instance]:
    data = _data(body, "instances")
    if not isinstance(data, list) or len(data) > 10_000:
        raise ProviderError("Lambda's instances answer is not a list")
    return [instance(i, node_port) for i in data]


def one_instance(body: Any, node_port: int | None = None) -> Instance:
    return instance(_data(body, "the instance"), node_port)


def launched_ids(body: Any) -> list[str]:
    data = _data(body, "launch")
    ids = data.get("instance_ids") if isinstance(data, dict) else None
    valid = isinstance(ids, list) and all(isinstance(i, str) and 0 < len(i) <= MAX_ID for i in ids)
    if not valid or not ids:  # ambiguous: the caller looks for the instance by name
        raise ProviderError("Lambda's launch answer has no instance_ids")
    return ids


def terminated(body: Any) -> list[Instance]:
    data = _data(body, "terminate")
    items = data.get("terminated_instances") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ProviderError("Lambda's terminate answer has no terminated_instances")
    return [instance(i) for i in items]


def error_code(body: Any) -> tuple[str, str] | None:
    """(code, message) of an error envelope, or None when `body` is not one."""
    raw = body.get("error") if isinstance(body, dict) else None
    try:
        error = _ErrorBody.model_validate(raw)
    except ValidationError:
        return None
    return error.code, clip(error.message, 300)


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (Lambda documents no 429; a proxy's may carry one), bounded."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None  # absent, or an HTTP date: the caller backs off on its own
    return min(seconds, 3600.0) if math.isfinite(seconds) and seconds >= 0 else None


def error_for(
    status: int, body: Any, what: str, retry_after_header: str | None = None
) -> CloudError:
    """The exception for a failed call: by Lambda's `code` first, by HTTP status when the body
    is not Lambda's envelope (a proxy's page, garbage). A 429 is `RateLimited`."""
    found = error_code(body)
    code, message = found if found else ("", "")
    text = f"{what}: Lambda answered {status}" + (f" {code}: {message}" if code else "")
    if status == 429:
        return RateLimited(text, retry_after(retry_after_header))
    if code == "instance-operations/launch/insufficient-capacity":
        return CapacityError(text)
    if code == "global/quota-exceeded":
        return QuotaError(text)
    if code == "global/invalid-api-key" or status == 401:
        return AuthError(f"{what}: Lambda refused the API key (401 {code or 'unauthorized'})")
    if code.startswith("provider/") or status == 429 or status >= 500 or not found:
        return ProviderError(text if found else f"{what}: Lambda answered {status} without JSON")
    return CloudError(text)  # account inactive, invalid parameters, not found: fix, not retry


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return clip(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}", 200)
