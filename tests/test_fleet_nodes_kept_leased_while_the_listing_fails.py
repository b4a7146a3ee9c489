"""A controller whose cloud listing fails (an API outage, and the scans backing off after it) still
runs: it keeps renewing the dead-man leases of the nodes it last read, so no node stops its
instance under it. The leases lapse only once the controller is gone."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fleet_mock_world import NODE_TOKEN, controller, launch, start_mock, statuses
from procure.clouds.base import Instance, ProviderError
from procure.fleet.controller import scan_once


@dataclass
class ListingDown:
    """The cloud with its listing failing (HTTP 503 for every `GET /instances`)."""

    inner: Any

    async def instances(self) -> list[Instance]:
        raise ProviderError("HTTP 503 from the cloud's listing")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("new_process_each_scan", [False, True], ids=["running", "once"])
def test_a_failing_listing_keeps_the_nodes_leases_renewed(
    sqlite_url: str, new_process_each_scan: bool
) -> None:
    """Before the fix: only a scan whose listing answered read the nodes, and renewing the node's
    dead-man lease rode on that read: with the cloud's listing down for one node lease (15 min
    by default, every scan failing or backing off), every node's lease lapsed and each stopped
    its own instance (GPU_WORKER_ON_ORPHAN) under a controller that ran all along. `once`:
    `fleet run --once` from a scheduler, a process that has read no node before its scan."""
    mock = start_mock()

    async def body() -> None:
        await launch(mock, "worker")
        async with controller(sqlite_url, mock, node_lease_s=2.0) as ctx:
            mock.state.clock.advance(61)  # booted: its node answers
            assert (await scan_once(ctx)).error is None
            (instance,) = [i for i in await ctx.cloud.instances() if i.name == "worker"]
            node = f"http://{instance.ip}:{ctx.cfg.node_port}/lease"
            headers = {"Authorization": f"Bearer {NODE_TOKEN}"}
            async with httpx.AsyncClient(timeout=10) as client:

                async def lease() -> str:
                    try:
                        return str((await client.get(node, headers=headers)).json()["state"])
                    except httpx.ConnectError:  # the stop action ended the instance and its node
                        return "gone"

                assert await lease() == "armed"
                cloud, ctx.cloud = ctx.cloud, ListingDown(ctx.cloud)  # type: ignore[assignment]
                try:
                    # Twice the node's lease of scans that fail or back off, the controller up.
                    until = time.monotonic() + 4.0
                    while time.monotonic() < until:
                        if new_process_each_scan:
                            ctx.leased, ctx.backoff_until = {}, None
                        result = await scan_once(ctx)
                        assert result.error and result.leased, result.error
                        await asyncio.sleep(0.2)
                    state = await lease()
                finally:
                    ctx.cloud = cloud
            assert state == "armed", f"the node's lease under a running controller: {state}"
            assert statuses(mock)["worker"] == "active"

    try:
        asyncio.run(body())
    finally:
        mock.stop()
