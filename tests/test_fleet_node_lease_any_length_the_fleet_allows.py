"""Every dead-man lease length the fleet's settings accept (LAMBDA_LABS_NODE_LEASE_S), the GPU
node takes: a renewal the node refuses leaves its switch unarmed without a word, or lets a lease
armed before lapse under a controller that runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from annotated_types import Le

from gpu_fakes import FakeNvml, two_gpus
from procure.clouds.base import Instance
from procure.fleet import nodes
from procure.fleet.settings import FleetSettings
from test_gpu_service import TOKEN, worker


def _longest_lease_s() -> float:
    """The largest LAMBDA_LABS_NODE_LEASE_S the fleet's settings accept."""
    (bound,) = [
        m.le for m in FleetSettings.model_fields["node_lease_s"].metadata if isinstance(m, Le)
    ]
    return float(bound)


def test_the_node_takes_the_longest_lease_the_fleet_allows(tmp_path: Path) -> None:
    """Before the fix: the fleet accepted a node lease of up to 30 days, the node at most 7
    (`POST /lease` answered 422 above it): a controller set to 8 days renewed nothing, its
    `renew_lease` saying only "error", so no node's switch was ever armed, and one armed by an
    earlier setting lapsed and stopped its instance under a running controller."""
    longest = _longest_lease_s()
    cfg = FleetSettings(_env_file=None, node_lease_s=longest)  # type: ignore[call-arg]
    env = {"GPU_WORKER_ON_ORPHAN": "true", "GPU_WORKER_CHECKPOINT_DIR": str(tmp_path)}
    with worker(FakeNvml(two_gpus()), **env) as node:
        host, port = node.base_url.host, node.base_url.port
        assert port is not None
        instance = Instance("i-1", None, "active", "gpu_1x_a100", "us-east-1", host, 1_290_000)

        async def renew() -> str:
            async with httpx.AsyncClient(timeout=10) as client:
                return await nodes.renew_lease(
                    client, instance, port, TOKEN, "procure-fleet:default", cfg.node_lease_s
                )

        assert asyncio.run(renew()) == "armed"
        lease = node.get("/lease").json()
        assert lease["state"] == "armed" and lease["ttl_s"] == longest
