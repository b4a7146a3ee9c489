"""The Nodes page's data: each live GPU node's latest stored figures (from the fleet's samples),
when it last answered, and its models, asked of the node's `GET /models` under a short deadline,
at the address the fleet checked to be the instance's own and nowhere else. Never raises for a
node: one that does not answer, or answers garbage, says so in its `models.error`; one the last
scan found unreachable says why (`latest.error`) and since when (`last_seen_at`,
`unreachable_for_s`)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from procure.bounds import UnsafeInput, clip, loads
from procure.fleet.settings import FleetSettings
from procure.fleet.summary import instances
from procure.gpu.jobclient import check_node_url
from procure.httpbounds import bounded_client
from procure.models import utcnow
from procure.safetext import outside
from procure.store import Store, fleet_repo
from procure.store.fleet_repo import RUNNING_STATUSES
from procure.store.fleet_tables import FleetInstanceRow, FleetSampleRow

MODELS_DEADLINE_S = 2.0  # the page waits at most this long on any node
MODELS_MAX_BYTES = 256 * 1024
MAX_MODELS = 50
PARALLEL = 16


def last_seen(s: Session, instance_ids: list[str]) -> dict[str, datetime]:
    """Each instance's latest sample in which its node answered (among the samples kept)."""
    if not instance_ids:
        return {}
    rows = s.execute(
        select(FleetSampleRow.instance_id, func.max(FleetSampleRow.taken_at))
        .where(FleetSampleRow.instance_id.in_(instance_ids), FleetSampleRow.reachable.is_(True))
        .group_by(FleetSampleRow.instance_id)
    )
    return {instance_id: taken_at for instance_id, taken_at in rows if taken_at is not None}


def checked_addresses(s: Session, cfg: FleetSettings, instance_ids: list[str]) -> dict[str, str]:
    """Each instance's node address as the controller's latest scan checked it. One that scan
    did not list (the listing failed since, or left it out) is not taken: on RunPod and Vast.ai
    a pod restarted meanwhile may have left its mapped port to another tenant."""
    if not instance_ids:
        return {}
    lease = fleet_repo.lease_row(s, f"fleet:{cfg.fleet_name}")
    scanned = lease.last_scan_at if lease is not None else None
    rows = s.execute(
        select(
            FleetInstanceRow.instance_id, FleetInstanceRow.node_url, FleetInstanceRow.last_seen_at
        ).where(FleetInstanceRow.instance_id.in_(instance_ids))
    )
    return {i: url for i, url, seen in rows if url and (scanned is None or seen >= scanned)}


def figures(store: Store, cfg: FleetSettings) -> list[dict[str, Any]]:
    """Live instances with their latest sample and anomalies, and when each node last answered:
    `last_seen_at` (None: never, in the samples kept) and, for a node unreachable at the last
    scan, `unreachable_for_s` (from then to that scan, on the controller's clock); `node_url`:
    where the latest scan checked its node answers (None: nowhere). Sync: run it in a thread."""
    with store.session() as s:
        listed = instances(s, cfg, utcnow())
        ids = [n["instance_id"] for n in listed]
        seen, addresses = last_seen(s, ids), checked_addresses(s, cfg, ids)
    for node in listed:
        when = seen.get(node["instance_id"])
        node["node_url"] = addresses.get(node["instance_id"])
        latest = node.get("latest")
        node["last_seen_at"] = when.isoformat() if when else None
        node["unreachable_for_s"] = None
        if latest and not latest.get("reachable") and when is not None:
            taken = datetime.fromisoformat(latest["taken_at"])
            node["unreachable_for_s"] = max(0.0, (taken - when).total_seconds())
    return listed


def _model(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return None
    size = entry.get("size")
    vram = entry.get("size_vram_mb")
    return {
        "name": clip(entry["name"], 200),
        "parameter_size": clip(str(entry.get("parameter_size") or ""), 40) or None,
        "quantization": clip(str(entry.get("quantization_level") or ""), 40) or None,
        # Bytes; past an exabyte it is garbage (and a 400-digit int overflows a float).
        "size_gb": size / 1e9 if isinstance(size, int) and 0 <= size <= 10**18 else None,
        "vram_mb": vram if isinstance(vram, int) and vram >= 0 else None,
    }


def catalogue(answer: Any) -> dict[str, Any]:
    """A node's `/models` answer → what the page shows (pulled and loaded models)."""
    if not isinstance(answer, dict):
        return {"state": "error", "error": "the node's answer is not a JSON object"}
    pulled = answer.get("models") if isinstance(answer.get("models"), list) else []
    loaded = answer.get("loaded") if isinstance(answer.get("loaded"), list) else []
    status = answer.get("status")
    error = answer.get("error")
    return {
        "state": status if status in ("ok", "degraded", "not_configured") else "error",
        "error": outside(error, 300) if error else None,
        "models": [m for m in map(_model, pulled[:MAX_MODELS]) if m],
        "loaded": [m for m in map(_model, loaded[:MAX_MODELS]) if m],
    }


# The page says "Not asked: …" before it.
UNCHECKED = (
    "no address the fleet checked to be this instance's own (the node token goes to the "
    "instance's own node only)"
)


def checked_url(node: dict[str, Any]) -> str | None:
    """Where to ask the node: the address the controller read it at in its latest scan, checked
    then to be the instance's own (`fleet.node_leases.address`: on RunPod and Vast.ai the IP is
    shared and the cloud maps the node's port, so the IP and LAMBDA_LABS_NODE_PORT may reach
    another tenant's machine), and still on the instance's IP. None: no such address."""
    url, ip = node.get("node_url"), node.get("ip")
    if not isinstance(url, str) or not isinstance(ip, str) or not ip:
        return None
    try:
        return check_node_url(url, expected_host=ip)
    except ValueError:
        return None


async def models_of(
    client: httpx.AsyncClient, node: dict[str, Any], cfg: FleetSettings
) -> dict[str, Any]:
    """The node's models; a node not running, without an address the fleet checked, or last
    seen unreachable is not asked (the page would only wait for the deadline)."""
    latest = node.get("latest") or {}
    if node.get("status") not in RUNNING_STATUSES or not node.get("ip"):
        return {"state": "skipped", "error": "not running or no address"}
    if latest and not latest.get("reachable"):
        return {"state": "skipped", "error": "unreachable at the last scan"}
    base = checked_url(node)
    if base is None:
        return {"state": "skipped", "error": UNCHECKED}
    token = cfg.node_token.get_secret_value() if cfg.node_token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = await client.get(f"{base}/models", headers=headers)
        if response.status_code != 200:
            return {"state": "error", "error": f"HTTP {response.status_code} from the node"}
        return catalogue(loads(response.content))
    except (httpx.HTTPError, httpx.InvalidURL, UnsafeInput, ValueError) as exc:
        return {"state": "error", "error": outside(f"{type(exc).__name__}: {exc}", 300)}


async def nodes_view(
    store: Store,
    cfg: FleetSettings,
    *,
    deadline_s: float = MODELS_DEADLINE_S,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[dict[str, Any]]:
    """Every live node with `models` added; all nodes are asked at once."""
    nodes = await asyncio.to_thread(figures, store, cfg)
    gate = asyncio.Semaphore(PARALLEL)

    async def ask(client: httpx.AsyncClient, node: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            return await models_of(client, node, cfg)

    async with bounded_client(
        deadline_s=deadline_s,
        max_bytes=MODELS_MAX_BYTES,
        transport=transport,
        follow_redirects=False,
    ) as client:
        found = await asyncio.gather(*(ask(client, n) for n in nodes))
    return [{**node, "models": models} for node, models in zip(nodes, found, strict=True)]
