"""The fleet controller on RunPod and Vast.ai (`procure fleet run --cloud runpod|vast`): through
each provider's client against its mock over HTTP, it lists the account's instances and reads
each one's GPU node where the cloud maps the node's port — and a node address that is not the
instance's own is never sent the node token."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from procure.clouds.base import LaunchSpec, RentalCloud
from procure.fleet.context import FleetContext
from procure.fleet.controller import scan_once
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.models import utcnow
from procure.store import fleet_repo, open_store

NODE_TOKEN = "fleet-node-token"


def runpod() -> tuple[Any, RentalCloud, Callable[[float], None]]:
    from procure.clouds.runpod.client import RunPodCloud
    from procure.clouds.runpod.mock import start_mock_cloud
    from procure.clouds.runpod.mockstate import RunPodMockConfig
    from procure.clouds.runpod.settings import RunPodSettings

    mock = start_mock_cloud(RunPodMockConfig(speed=0, node_token=NODE_TOKEN))
    cloud = RunPodCloud(
        RunPodSettings(RUNPOD_API_KEY=mock.state.config.api_key, RUNPOD_API_URL=mock.url)
    )
    return mock, cloud, mock.state.clock.advance


def vast() -> tuple[Any, RentalCloud, Callable[[float], None]]:
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.mock import start_mock_cloud
    from procure.clouds.vast.mockstate import MockVastConfig
    from procure.clouds.vast.settings import VastSettings

    mock = start_mock_cloud(MockVastConfig(speed=0, node_token=NODE_TOKEN, rate_scale=0))
    cloud = VastCloud(
        VastSettings(VAST_API_KEY=mock.api_key, VAST_API_URL=mock.url, VAST_PACE_SCALE=0)
    )
    return mock, cloud, mock.state.clock.advance


@pytest.mark.parametrize("provider", [runpod, vast], ids=["runpod", "vast"])
def test_the_fleet_reads_nodes_where_the_cloud_maps_their_port(
    provider: Callable[[], tuple[Any, RentalCloud, Callable[[float], None]]], sqlite_url: str
) -> None:
    mock, cloud, advance = provider()
    store = open_store(sqlite_url)

    async def body() -> None:
        offer = next(o for o in await cloud.offers() if not o.interruptible)
        launched = await cloud.launch_spec(LaunchSpec(name="procure-fleet-e2e", offer=offer))
        advance(3600)  # booted
        ctx = FleetContext(
            store=store,
            cloud=cloud,  # type: ignore[arg-type]
            nodes=bounded_client(deadline_s=10),
            cfg=FleetSettings(
                _env_file=None,  # type: ignore[call-arg]
                node_token=NODE_TOKEN,
                min_instances=0,
                dry_run=True,
            ),
            mapped_ports=True,
        )
        try:
            result = await scan_once(ctx)
        finally:
            await ctx.nodes.aclose()
            await cloud.aclose()
        assert result.error is None and result.instances == 1
        with store.session() as s:
            samples = fleet_repo.samples_since(s, [launched.id], utcnow() - timedelta(days=1))
        assert [x.reachable for x in samples] == [True], [x.error for x in samples]
        assert samples[0].gpu_util is not None  # the node's own NVML figures, read over HTTP

    try:
        asyncio.run(body())
    finally:
        store.dispose()
        mock.stop()


def test_a_node_address_that_is_not_the_instances_is_not_read() -> None:
    from procure.clouds.base import Instance
    from procure.fleet.nodes import node_url

    def inst(url: str) -> Instance:
        return Instance(
            id="i",
            name="n",
            status="active",
            instance_type="t",
            region="r",
            ip="203.0.113.7",
            price_per_hour=1,
            node_url=url,
        )

    assert node_url(inst("http://203.0.113.7:40123"), 0) == "http://203.0.113.7:40123"
    for trick in (
        "http://198.51.100.1:40123",  # another host
        "http://203.0.113.7@198.51.100.1:40123",  # user info
        "http://203.0.113.7:40123/steal",  # a path
        "file:///etc/passwd",
    ):
        assert node_url(inst(trick), 0) is None, trick
