"""Session 14's review of the offers cache, the Vast client, the fleet controller and the
gateway: behaviours a user would notice, each proved failing before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procure.clouds.base import ProviderError
from procure.clouds.vast.mockstate import Machine
from procure.fleet import policy, rails
from procure.fleet.controller import scan_once
from test_fleet_on_runpod_and_vast import fleet as vast_fleet
from test_fleet_on_runpod_and_vast import vast_world
from test_gateway import GatewayWorld, start_gateway_world


@pytest.fixture
def started() -> Iterator[list[GatewayWorld]]:
    worlds: list[GatewayWorld] = []
    yield worlds
    for g in worlds:
        g.stop()


def test_destroying_a_lost_launch_does_not_hold_the_fleets_next_termination_in_cooldown(
    sqlite_url: str,
) -> None:
    """Before the fix: the controller's own clean-up of a launch the cloud had lost (destroyed
    so it stops billing its disk) counted as the fleet's last termination, so for the whole
    action cooldown (30 min by default) every termination the policy then wanted (an idle or
    broken instance billing its GPU) was blocked "in cooldown"."""
    host = {"storage_cost": 3.6}
    machines = [
        Machine(7_500_001, "RTX 4090", 1, "California, US", 0.40, **host),
        Machine(7_500_002, "RTX 4090", 1, "California, US", 0.41, **host),
    ]
    mock, cloud = vast_world(boot_s=60, machines=machines)

    def destroyed(instance_id: int) -> bool:
        with mock.state.lock:
            inst = mock.state.instances[instance_id]
            return inst.destroyed_at is not None and inst.destroyed_at <= mock.state.now()

    async def body() -> None:
        async with vast_fleet(sqlite_url, mock, cloud, default_instance_type="vast_1x_RTX4090",
                              region="California, US", min_instances=1, max_hourly_spend=100,
                              high_gpu_threshold=100, boot_timeout_mins=10,
                              action_cooldown_mins=30) as ctx:  # fmt: skip
            for _ in range(5):
                await scan_once(ctx)
                mock.state.clock.advance(60)
            [first] = list(mock.state.instances)
            mock.state.preempt(first)  # its host dies: the fleet replaces it, then destroys it
            for _ in range(60):
                await scan_once(ctx)
                if destroyed(first):
                    break
                mock.state.clock.advance(60)
            assert destroyed(first), "the lost launch was never destroyed"
            for _ in range(60):  # its replacement, once the launch cooldown allows it
                if len(mock.state.instances) > 1:
                    break
                mock.state.clock.advance(60)
                await scan_once(ctx)
            replacement = next(i for i in mock.state.instances if i != first)
            # What the policy proposes for an instance it wants gone (idle, broken, surplus).
            wanted = policy.Proposal(
                policy.TERMINATE,
                str(replacement),
                "idle",
                "vast_1x_RTX4090",
                "California, US",
                410_000,
            )
            with ctx.store.session() as s:
                verdict = rails.check(s, wanted, ctx.cfg, ctx.caps, ctx.clock(), dry_run=False)
            assert verdict.outcome != "blocked", verdict

    try:
        asyncio.run(body())
    finally:
        mock.stop()


# --- the gateway's offers cache while the cloud fails ---------------------------------------


class _FailingCatalogue:
    """The mock cloud, its whole catalogue (`offers()`, what quotes and paid submits read)
    failing after a while (a cloud timing out), each such read counted."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        if kwargs:
            return list(await self.inner.offers(**kwargs))
        self.reads += 1
        await asyncio.sleep(0.2)
        raise ProviderError("timed out")


def test_quotes_asked_together_while_the_cloud_fails_share_its_one_failure(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: the quotes' catalogue is read under one lock, but a read that failed was
    not shared: each quote waiting on it read the cloud again, one after the other, so 20
    quotes asked together while the cloud timed out were 20 calls in a row, and a paid submit
    asked meanwhile waited behind every one of them (twenty timeouts) before its answer."""
    g = start_gateway_world(tmp_path, sqlite_url)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _FailingCatalogue(rt.cloud)

    assert g.quotes_together(20) == [503] * 20
    assert cloud.reads == 1, f"{cloud.reads} catalogue reads, in a row, for 20 quotes together"
