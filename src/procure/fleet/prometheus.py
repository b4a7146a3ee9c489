"""The controller's other figure source: a Prometheus server scraping dcgm-exporter, read through
its HTTP API (`/api/v1/query`) into the same samples as `nodes.read_node`. Never raises."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from procure.bounds import clip, loads
from procure.clouds.base import Instance
from procure.fleet.nodes import bounded

# Sample figure -> dcgm-exporter series. Raw per-GPU series (not PromQL aggregates), so the
# per-instance figures are computed exactly as `nodes.figures` computes them from /gpu-check.
SERIES = {
    "gpu_util": "DCGM_FI_DEV_GPU_UTIL",
    "temperature_c": "DCGM_FI_DEV_GPU_TEMP",
    "power_w": "DCGM_FI_DEV_POWER_USAGE",
    "memory_used_mb": "DCGM_FI_DEV_FB_USED",
    "last_xid": "DCGM_FI_DEV_XID_ERRORS",
}
MAX_SERIES = 10_000  # per query: a fleet's GPUs, with room; a runaway answer stops here
MAX_GPUS = 64  # per host, as a node's /gpu-check is read


class PrometheusError(Exception):
    """Prometheus answered, but not with a success vector."""


async def query(client: httpx.AsyncClient, base_url: str, promql: str) -> list[tuple[str, float]]:
    """An instant query: (the series' `instance` label, its value) per series."""
    response = await client.get(f"{base_url.rstrip('/')}/api/v1/query", params={"query": promql})
    body = loads(response.content)  # Prometheus answers its errors in JSON too
    if not isinstance(body, dict) or body.get("status") != "success":
        detail = (
            body if not isinstance(body, dict) else f"{body.get('errorType')}: {body.get('error')}"
        )
        raise PrometheusError(f"HTTP {response.status_code}: {detail}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        raise PrometheusError("the answer is not an instant vector")
    result = data.get("result")
    if not isinstance(result, list):
        raise PrometheusError("the answer has no result list")
    found: list[tuple[str, float]] = []
    for item in result[:MAX_SERIES]:
        metric = item.get("metric") if isinstance(item, dict) else None
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(metric, dict) or not isinstance(value, list) or len(value) != 2:
            continue
        try:
            number = float(value[1])  # Prometheus sends sample values as strings
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            found.append((str(metric.get("instance", "")), number))
    return found


def host_of(instance_label: str) -> str:
    """`10.0.0.5:9400` → `10.0.0.5`; `[fe80::1]:9400` → `fe80::1`."""
    if instance_label.startswith("["):
        return instance_label[1:].split("]", 1)[0]
    return instance_label.rsplit(":", 1)[0] if instance_label.count(":") == 1 else instance_label


def _kept(values: list[float], most: float) -> list[float]:
    """A host's series of one figure, bounded as `/gpu-check`'s are (64 GPUs, each figure
    clamped): one absurd exporter must not overflow the store's columns and stop every scan."""
    return [v for x in values[:MAX_GPUS] if (v := bounded(x, most)) is not None]


def _figures(found: dict[str, list[float]]) -> dict[str, Any]:
    utils = _kept(found.get("gpu_util", []), 100)
    temps = _kept(found.get("temperature_c", []), 500)
    power = _kept(found.get("power_w", []), 1e5)
    memory = _kept(found.get("memory_used_mb", []), 1e7)
    xids = _kept(found["last_xid"], 1e7) if "last_xid" in found else None
    return {
        "reachable": True,
        "gpu_util": min(100.0, max(0.0, sum(utils) / len(utils))) if utils else None,
        "temperature_c": max(temps) if temps else None,
        "power_w": sum(power) if power else None,
        "memory_used_mb": int(sum(memory)) if memory else None,
        # dcgm gives the last XID per GPU, not a count: the GPUs that have had one.
        "xid_errors": sum(1 for x in xids if x) if xids is not None else None,
        "gpus_failing": 0,
        "error": None,
    }


async def read_instances(
    client: httpx.AsyncClient,
    base_url: str,
    listing: list[Instance],
    now: datetime,
    *,
    sharing: list[Instance] | None = None,
) -> list[dict[str, Any]]:
    """One sample per instance of `listing`, matched by the `instance` label's host (the scrape
    target, `<ip>:<port>`) against the instance's IP: the cloud's listing knows the IP, not the
    node's hostname (dcgm's `Hostname`). An instance without series is unreachable."""
    base = [{"instance_id": i.id, "taken_at": now} for i in listing]
    answers = await asyncio.gather(
        *(query(client, base_url, name) for name in SERIES.values()), return_exceptions=True
    )
    for answer in answers:
        if isinstance(answer, Exception):  # refused, timed out, an error answer, garbage
            error = clip(f"Prometheus: {type(answer).__name__}: {answer}", 300)
            return [sample | {"reachable": False, "error": error} for sample in base]
        if isinstance(answer, BaseException):
            raise answer  # cancelled: not ours to swallow
    by_host: dict[str, dict[str, list[float]]] = {}
    by_target: dict[str, dict[str, list[float]]] = {}
    vectors = [answer for answer in answers if isinstance(answer, list)]  # all of them, now
    for figure, vector in zip(SERIES, vectors, strict=True):
        for label, value in vector:
            by_host.setdefault(host_of(label), {}).setdefault(figure, []).append(value)
            by_target.setdefault(label, {}).setdefault(figure, []).append(value)
    # RunPod and Vast.ai put several instances behind one IP (each with its own mapped port):
    # their series are told apart by the scrape target, never merged by the IP.
    shared = Counter(i.ip for i in {i.id: i for i in [*listing, *(sharing or [])]}.values() if i.ip)
    samples = []
    for sample, instance in zip(base, listing, strict=True):
        target = urlsplit(instance.node_url).netloc if instance.node_url else ""
        found = by_target.get(target) if target else None
        if found is None and shared[instance.ip] == 1:
            found = by_host.get(instance.ip or "")
        if found:
            samples.append(sample | _figures(found))
            continue
        if instance.ip and shared[instance.ip] > 1:
            error = (
                f"{shared[instance.ip]} instances share {instance.ip}: its series are not its own"
            )
        else:
            error = f"Prometheus has no series for {instance.ip or 'an instance without IP'}"
        samples.append(sample | {"reachable": False, "error": error})
    return samples
