"""Vast.ai's wire format, read defensively: offers, instances and charges become `clouds.base`
types, error bodies (JSON in several shapes, or plain text) become its exceptions. Anything
unexpected is the provider's trouble, never a crash."""

from __future__ import annotations

import ipaddress
import logging
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
)

log = logging.getLogger(__name__)
MICROS = 1_000_000
BILLING_INCREMENT_S = 1  # GPU billed per second while running (docs: billing.mdx)
HOURS_A_MONTH = 720  # Vast's storage prices are $/GB a month
BOOTING = {None, "", "created", "loading", "rebooting", "restarting", "scheduling"}
# Never come back to running (the spec's "poll trap"): the instance is lost to us.
LOST = {"exited", "unknown", "offline"}
# Paused by Vast.ai (outbid, a balance run out) or stopped by the operator: the disk is kept, and
# the instance runs again once resumed (vast-ai/docs billing: stopped instances pay storage).
PAUSED = {"stopped", "frozen", "paused", "inactive"}
_FORM_FACTORS = re.compile(r"^(SXM\d?|PCIE|NVL|HBM\d?E?|\d+GB|\d+G)$")
_VENDORS = {"NVIDIA", "TESLA", "GEFORCE", "AMD", "RADEON"}


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Offer(_Loose):
    id: int = Field(ge=0, lt=2**63)
    gpu_name: str = Field(max_length=200)
    num_gpus: int = Field(ge=0, le=1024)
    dph_total: float = Field(ge=0, le=100_000)
    min_bid: float | None = Field(None, ge=0, le=100_000)
    storage_cost: float | None = Field(None, ge=0, le=100_000)  # $/GB a month
    geolocation: str | None = Field(None, max_length=200)
    direct_port_count: int = Field(0, ge=0, le=1_000_000)
    rentable: bool = True


class _Instance(_Loose):
    id: int = Field(ge=0, lt=2**63)
    actual_status: str | None = Field(None, max_length=100)
    intended_status: str | None = Field(None, max_length=100)
    label: str | None = Field(None, max_length=2048)
    is_bid: bool = False
    gpu_name: str = Field("", max_length=200)
    num_gpus: int = Field(1, ge=0, le=1024)
    dph_total: float = Field(0.0, ge=0, le=100_000)
    geolocation: str | None = Field(None, max_length=200)
    public_ipaddr: str | None = Field(None, max_length=100)
    ports: Any = None


def canonical_gpu(name: str) -> str:
    """Vast's GPU name as procure's model: "RTX 4090" → "RTX4090", "A100 SXM4" → "A100",
    "H100 NVL" → "H100", "Tesla V100" → "V100", "RTX A6000" → "A6000"."""
    words = [w for w in re.split(r"[\s_\-]+", name.upper()) if w]
    words = [w for w in words if w not in _VENDORS and not _FORM_FACTORS.match(w)]
    if len(words) > 1 and words[0] in ("RTX", "QUADRO") and words[1][:1].isalpha():
        words = words[1:]  # "RTX A6000" is the A6000; "RTX 4090" keeps its RTX
    return "".join(words)[:40]


def type_name(gpu: str, count: int) -> str:
    """The fleet's instance type for a Vast offer: GPU model and count (any host)."""
    return f"vast_{count}x_{gpu}"


def gpu_of_type(name: str) -> str | None:
    """The GPU model of a `type_name` ("vast_2x_RTX4090" → "RTX4090"); None for another name."""
    prefix, sep, gpu = name.partition("x_")
    return gpu if sep and prefix.startswith("vast_") and prefix[5:].isdecimal() and gpu else None


def count_of_type(name: str) -> int | None:
    """The GPU count of a `type_name` ("vast_8x_H100" → 8); None for another name."""
    prefix, sep, _ = name.partition("x_")
    count = prefix[5:]
    if not sep or not prefix.startswith("vast_") or not count.isdecimal() or len(count) > 4:
        return None
    return int(count)


def micros(usd_per_hour: float) -> int:
    return round(usd_per_hour * MICROS)


def offers(body: Any, *, interruptible: bool, disk_gb: float = 0.0) -> list[Offer]:
    """The offers of a search answer that procure can use (one direct port at least, for the
    node); malformed entries are skipped, a malformed answer is the provider's trouble. An
    on-demand offer's `dph_total` has the disk asked for in it; a bid (`min_bid`) is the GPU's
    alone, and Vast bills `disk_gb` of disk beside it: its price is both, as it will be billed."""
    raw = body.get("offers") if isinstance(body, dict) else None
    if not isinstance(raw, list) or len(raw) > 10_000:
        raise ProviderError("Vast.ai's search answer has no list of offers")
    found: list[Offer] = []
    for item in raw:
        try:
            o = _Offer.model_validate(item)
        except ValidationError as exc:
            log.warning("skipping a malformed Vast.ai offer: %s", _first(exc))
            continue
        if o.direct_port_count < 1 or not o.rentable or o.num_gpus < 1:
            continue
        price = micros(o.dph_total)
        if interruptible and o.min_bid is not None:
            price = micros(o.min_bid + (o.storage_cost or 0.0) * disk_gb / HOURS_A_MONTH)
        found.append(
            Offer(
                provider="vast",
                offer_id=str(o.id),
                gpu=canonical_gpu(o.gpu_name),
                gpu_count=o.num_gpus,
                region=o.geolocation or "unknown",
                price_per_hour=price,
                interruptible=interruptible,
                available=1,  # an ask is one machine's bundle: rented whole or not at all
                billing_increment_s=BILLING_INCREMENT_S,
                min_bid_per_hour=micros(o.min_bid) if interruptible and o.min_bid else None,
            )
        )
    return found


def search_page(body: Any) -> tuple[list[str], float | None]:
    """The ids of every ask in a search answer (usable or not) and its highest `dph_total`
    (None when it has none): where a search ordered by price goes on."""
    raw = body.get("offers") if isinstance(body, dict) else None
    items = [o for o in raw if isinstance(o, dict)] if isinstance(raw, list) else []
    ids = [str(o.get("id")) for o in items]
    prices = [
        float(p)
        for p in (o.get("dph_total") for o in items)
        if isinstance(p, int | float) and not isinstance(p, bool) and 0 <= p <= 100_000
    ]
    return ids, max(prices, default=None)


def status(actual: str | None, intended: str | None, is_bid: bool) -> InstanceStatus:
    """Vast's statuses as procure's. An outbid bid is paused (intended running, actual not),
    a host that died reads offline/unknown/exited: both are lost to the job (preempted)."""
    if actual == "running":
        return "active"
    if actual in BOOTING:
        return "booting"
    if actual == "destroyed":
        return "terminated"
    if actual in LOST:
        return "preempted"
    if actual in PAUSED:
        # Paused by Vast (outbid, host trouble, balance) or stopped on purpose.
        return "preempted" if is_bid or intended == "running" else "exited"
    return "unhealthy"  # a status we do not know: never guessed gone (see `instance`)


def instance(raw: Any, node_port: int) -> Instance:
    try:
        i = _Instance.model_validate(raw)
    except ValidationError as exc:
        raise ProviderError(f"Vast.ai's instance is malformed: {_first(exc)}") from None
    state = status(i.actual_status, i.intended_status, i.is_bid)
    url = node_url(i.public_ipaddr, i.ports, node_port) if state == "active" else None
    if state == "unhealthy":
        log.warning(
            "Vast.ai instance %s has an unknown status %r", i.id, clip(i.actual_status or "", 40)
        )
        # Vast.ai adds statuses: one it maps a port for is judged by its node (whoever reads it:
        # a node that answers works; one that never answers is stuck), never killed for a word.
        url = node_url(i.public_ipaddr, i.ports, node_port)
        state = "active" if url else state
    gpu = canonical_gpu(i.gpu_name)
    return Instance(
        id=str(i.id),
        name=i.label,
        status=state,
        instance_type=type_name(gpu, i.num_gpus),
        region=i.geolocation or "unknown",
        ip=_ip(i.public_ipaddr),
        price_per_hour=micros(i.dph_total),
        gpus=i.num_gpus,
        node_url=url,
        interruptible=i.is_bid,
        gpu=gpu,
        resumable=i.actual_status in PAUSED,
    )


def node_url(ip: str | None, ports: Any, node_port: int) -> str | None:
    """`http://{public_ipaddr}:{HostPort}` of the node's mapped port, or None when Vast does not
    (yet) say where it is. Both parts are checked: this URL will receive the node's token."""
    address = _ip(ip)
    mapped = ports.get(f"{node_port}/tcp") if isinstance(ports, dict) else None
    if address is None or not isinstance(mapped, list) or not mapped:
        return None
    first = mapped[0]
    host_port = first.get("HostPort") if isinstance(first, dict) else None
    if not isinstance(host_port, str | int) or not str(host_port).isdecimal():
        return None
    if not 0 < int(host_port) < 65536:
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{int(host_port)}"


def _ip(value: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address((value or "").strip()))
    except ValueError:
        return None


def instances_page(body: Any, node_port: int) -> tuple[list[Instance], str | None]:
    """One page of `GET /api/v1/instances/`: its instances and the next page's token."""
    raw = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(raw, list) or len(raw) > 1000:
        raise ProviderError("Vast.ai's instances answer has no list of instances")
    token = body.get("next_token")
    if token is not None and (not isinstance(token, str) or len(token) > 2000):
        raise ProviderError("Vast.ai's instances answer has a malformed next_token")
    return [instance(r, node_port) for r in raw], token or None


def one_instance(body: Any, node_port: int) -> Instance | None:
    """`GET /api/v0/instances/{id}/`: `{"instances": null}` is an instance Vast no longer has."""
    if not isinstance(body, dict) or "instances" not in body:
        raise ProviderError("Vast.ai's instance answer has no `instances`")
    raw = body["instances"]
    return None if raw is None else instance(raw, node_port)


def new_contract(body: Any) -> str:
    contract = body.get("new_contract") if isinstance(body, dict) else None
    if isinstance(contract, bool) or not isinstance(contract, int) or contract < 0:
        raise ProviderError("Vast.ai's launch answer has no new_contract")
    return str(contract)


def charges_page(body: Any, instance_id: str) -> tuple[int | None, str | None]:
    """Micro-USD charged to `instance-<id>` on this page of `GET /api/v0/charges/` (None if it
    is not there), and the next page's token."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) > 10_000:
        raise ProviderError("Vast.ai's charges answer has no results")
    token = body.get("next_token")
    token = token if isinstance(token, str) and 0 < len(token) <= 2000 else None
    found: int | None = None
    for row in results:
        if not isinstance(row, dict) or row.get("source") != f"instance-{instance_id}":
            continue
        amount = row.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ProviderError("Vast.ai's charge has no amount")
        if not 0 <= amount < 1e9:
            raise ProviderError("Vast.ai's charge amount is out of range")
        found = (found or 0) + round(amount * MICROS)
    return found, token


def error_text(body: Any, raw: bytes) -> tuple[str, str]:
    """(error code, message) of a Vast error: `{success, error, msg}`, `{detail}`, `{message}`,
    or plain text (429s). Codes are Vast's (`invalid_args`, `no_such_ask`, ...)."""
    if isinstance(body, dict):
        code = body.get("error")
        message = body.get("msg") or body.get("detail") or body.get("message") or ""
        code = code if isinstance(code, str) else ""
        message = message if isinstance(message, str) else ""
        return clip(code, 100), clip(message, 300)
    text = raw[:300].decode("utf-8", "replace") if raw else ""
    return "", clip(" ".join(text.split()), 300)


def threshold_s(message: str) -> float | None:
    """The interval in a 429's `threshold=X` (seconds, as the docs' examples read)."""
    found = re.search(r"threshold=([0-9]+(?:\.[0-9]+)?)", message)
    return min(float(found.group(1)), 600.0) if found else None


def error_for(status: int, body: Any, raw: bytes, what: str) -> CloudError:
    """The exception for a failed call, by Vast's error code first, then by HTTP status."""
    code, message = error_text(body, raw)
    json_body = isinstance(body, dict)
    text = f"{what}: Vast.ai answered {status}" + (f" {code}" if code else "")
    text += f": {message}" if message and (json_body or status == 429) else ""
    if status == 429:
        return RateLimited(text)
    # `invalid_token` with a 400 is a page token Vast no longer takes (its spec), not the key.
    key_refused = code in ("unauthorized", "auth_error")
    if status == 403 and "/asks/" in what and not key_refused:
        # createInstance's 403 (`invalid_args`: "Offer ... is not your own. Hosts can only
        # rent their own machines.") refuses that ask, not the key: the next ask is tried.
        return CapacityError(text)
    if status in (401, 403) or key_refused:
        return AuthError(f"{what}: Vast.ai refused the API key ({status} {code or 'denied'})")
    if code == "no_such_ask" or "no_such_ask" in message or status == 410:
        return CapacityError(text)
    if code in ("insufficient_credit", "insufficient_funds", "max_instances"):
        return QuotaError(text)
    if status >= 500 or not json_body:
        return ProviderError(text if json_body else f"{what}: Vast.ai answered {status} (no JSON)")
    if status == 404:
        return CapacityError(text) if "/asks/" in what else CloudError(text)
    return CloudError(text)  # invalid_args, invalid_price, ...: fix, do not retry


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    return clip(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}", 200)
