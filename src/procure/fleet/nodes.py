"""Talking to the GPU nodes: read one node's figures (`POST /gpu-check`) into a sample, and renew
the controller's dead-man lease on it (`POST /lease`). Never raises: a node that does not answer,
or answers garbage, is an unreachable sample."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import httpx

from procure.bounds import UnsafeInput, clip, loads
from procure.clouds.base import Instance, http_url
from procure.gpu.jobclient import check_node_url

AGENT_ID = "procure-fleet"
REFUSED = ("HTTP 401", "HTTP 403")  # a sample's error when the node refused the fleet's token


def refused(error: str | None) -> bool:
    """Whether an unreachable sample's node answered, refusing the token: the node runs, and the
    fault is the controller's configuration (its LAMBDA_LABS_NODE_TOKEN), not the instance's."""
    return error in REFUSED


def node_url(instance: Instance, port: int) -> str | None:
    """Where the instance's node answers: its ip and the fleet's node port, or (port 0, for
    clouds that map ports: RunPod, Vast.ai) the address the cloud gives, once it is checked to be
    a plain http(s) URL on the instance's own ip, so the node's token goes nowhere else."""
    if port == 0:
        if not instance.node_url or not instance.ip:
            return None
        try:
            return check_node_url(instance.node_url, expected_host=instance.ip)
        except ValueError:
            return None
    return http_url(instance.ip, port) if instance.ip else None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def bounded(value: Any, most: float = 1e6) -> float | None:
    """A figure from the node, or None; clamped to [0, most] (an NVML figure is never
    negative, and an absurd one must not overflow the store's columns)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int):  # any length of digits: clamped before float() could overflow
        return float(min(max(value, 0), int(most)))
    return min(max(value, 0.0), most) if math.isfinite(value) else None


def figures(answer: Any) -> dict[str, Any]:
    """A `/gpu-check` answer → the sample's figures (mean utilisation over the node's GPUs,
    hottest temperature, total power and memory, XID errors if the node reports them)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("gpus"), list):
        return {"reachable": False, "error": "the node's answer has no gpus list"}
    gpus = [g for g in answer["gpus"][:64] if isinstance(g, dict)]
    utils = [u for g in gpus if (u := bounded(g.get("utilization_gpu_pct"))) is not None]
    temps = [t for g in gpus if (t := bounded(g.get("temperature_c"), 500)) is not None]
    power = [p for g in gpus if (p := bounded(g.get("power_w"), 1e5)) is not None]
    # At most 64 GPUs: their sum stays far inside the columns (XID errors: a 32-bit integer).
    memory = [m for g in gpus if (m := bounded(g.get("memory_used_mb"), 1e7)) is not None]
    xids = [x for g in gpus if (x := bounded(g.get("xid_errors"), 1e7)) is not None]
    reason = answer.get("reason")
    return {
        "reachable": True,
        "gpu_util": min(100.0, max(0.0, sum(utils) / len(utils))) if utils else None,
        "temperature_c": max(temps) if temps else None,
        "power_w": sum(power) if power else None,
        "memory_used_mb": int(sum(memory)) if memory else None,
        "xid_errors": int(sum(xids)) if xids else None,
        "gpus_failing": sum(1 for g in gpus if g.get("error")),
        "error": clip(str(reason), 300) if reason and not gpus else None,
    }


async def read_node(
    client: httpx.AsyncClient, instance: Instance, port: int, token: str | None, now: datetime
) -> dict[str, Any]:
    """One sample of `instance` (a row of fleet_samples)."""
    sample: dict[str, Any] = {"instance_id": instance.id, "taken_at": now}
    url = node_url(instance, port)
    if url is None:
        return sample | {"reachable": False, "error": "the instance has no IP address yet"}
    try:
        response = await client.post(
            f"{url}/gpu-check", json={"agent_id": AGENT_ID}, headers=_headers(token)
        )
        if response.status_code != 200:
            return sample | {"reachable": False, "error": f"HTTP {response.status_code}"}
        return sample | figures(loads(response.content))
    except (httpx.HTTPError, httpx.InvalidURL, UnsafeInput, ValueError) as exc:
        return sample | {"reachable": False, "error": clip(f"{type(exc).__name__}: {exc}", 300)}


async def renew_lease(
    client: httpx.AsyncClient,
    instance: Instance,
    port: int,
    token: str | None,
    holder: str,
    ttl_s: float,
) -> str:
    """Renew the dead-man lease; what happened: armed | off (the node has no switch) | error."""
    url = node_url(instance, port)
    if url is None:
        return "error"
    try:
        response = await client.post(
            f"{url}/lease", json={"ttl_s": ttl_s, "holder": holder}, headers=_headers(token)
        )
    except (httpx.HTTPError, httpx.InvalidURL):
        return "error"
    if response.status_code == 200:
        return "armed"
    return "off" if response.status_code in (403, 409) else "error"


async def holds_lease(
    client: httpx.AsyncClient, instance: Instance, port: int, token: str | None, holder: str
) -> bool:
    """Whether the node's dead-man lease is armed and held by `holder` (`GET /lease`); False
    when it is not, or the node does not say."""
    url = node_url(instance, port)
    if url is None:
        return False
    try:
        response = await client.get(f"{url}/lease", headers=_headers(token))
        lease = loads(response.content) if response.status_code == 200 else None
    except (httpx.HTTPError, httpx.InvalidURL, UnsafeInput, ValueError):
        return False
    return (
        isinstance(lease, dict) and lease.get("state") == "armed" and lease.get("holder") == holder
    )
