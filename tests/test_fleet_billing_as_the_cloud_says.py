"""The fleet's policy reads how a cloud bills (its increment, and whether the boot is billed)
from the cloud client itself (`Cloud.billing_increment_s`, `Cloud.bills_boot`), never from its
provider's name: a cloud that is none of Lambda, RunPod and Vast.ai is billed as it says.

Where billing starts only once booted and comes by the hour, a boot that no queued job needs
any more is called off before it ends (it would be billed an hour for nothing, and booting is
free); where the boot is billed already, it is let be."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fleet_world import all_actions, fleet
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.vast.client import VastCloud
from procure.fleet.controller import scan_once
from procure.fleet.signal import cloud_billing
from test_fleet_signal import MultiGpuCloud, Queue, _procure


@pytest.fixture
def queue() -> Iterator[Queue]:
    q = Queue()
    try:
        yield q
    finally:
        q.stop()


@dataclass
class HourlyFromBoot(MultiGpuCloud):
    """A provider procure has no folder for, billed like Lambda but by the hour."""

    provider: str = "coreweave"
    billing_increment_s: int = 3600
    bills_boot: bool = False


@dataclass
class HourlyFromLaunch(MultiGpuCloud):
    """A cloud that names no provider and bills from the launch, the boot included."""

    billing_increment_s: int = 3600
    bills_boot: bool = True


async def _boot_whose_job_went_elsewhere(
    sqlite_url: str, queue: Queue, cloud: MultiGpuCloud
) -> tuple[str, list[tuple[str, str | None]]]:
    """A booting instance whose queued job waits for it, then goes elsewhere as its boot
    nears its end: the actions the controller takes."""
    queue.jobs = [{"gpus": 1, "waitingS": 600}]
    cloud.boot_scans = 100
    booting = cloud.add(util=0)
    cfg = _procure(queue, queue_wait_target_min=30, action_cooldown_mins=0)
    async with fleet(sqlite_url, cloud, **cfg) as ctx:
        for _ in range(5):  # its job waits for it: nothing to do
            await scan_once(ctx)
            ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
        assert all_actions(ctx) == [] and cloud.launches == []
        queue.jobs = []  # its job found a place elsewhere
        ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
        assert (await scan_once(ctx)).queue_error is None
        return booting, [(a.action_type, a.target_instance) for a in all_actions(ctx)]


def test_a_cloud_of_another_name_billed_from_the_boot_end_has_its_unneeded_boot_called_off(
    sqlite_url: str, queue: Queue
) -> None:
    """Before the fix: any provider other than "lambda" was taken to bill the boot, so the
    hourly cloud's unneeded boot was left to run into a paid hour nobody used."""
    booting, acts = asyncio.run(_boot_whose_job_went_elsewhere(sqlite_url, queue, HourlyFromBoot()))
    assert acts == [("terminate_instance", booting)]


def test_a_cloud_naming_no_provider_that_bills_the_boot_keeps_it(
    sqlite_url: str, queue: Queue
) -> None:
    """Before the fix: a cloud naming no provider was taken for Lambda (the boot free), so a
    boot already billed by the hour was called off, its paid hour thrown away."""
    _booting, acts = asyncio.run(
        _boot_whose_job_went_elsewhere(sqlite_url, queue, HourlyFromLaunch())
    )
    assert acts == []


def test_each_client_says_how_its_provider_bills() -> None:
    """Lambda by the minute from the end of the boot; RunPod and Vast.ai by the second from the
    launch (the clients' class attributes: no account needed)."""
    assert cloud_billing(LambdaCloud) == (60.0, False)
    assert cloud_billing(RunPodCloud) == (1.0, True)
    assert cloud_billing(VastCloud) == (1.0, True)
