"""A fleet launch whose node answers but whose every GPU fails in NVML (a GPU fallen off the bus:
"GPU is lost") bills and computes nothing, like one whose node is silent: it is terminated
through the rails once it has stayed so for the boot timeout, and the pool's minimum replaces
it. One GPU of several failing is not this: its node still works."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.fleet import monitor, stuck
from procure.fleet.policy import TERMINATE
from procure.fleet.settings import FleetSettings
from procure.store.fleet_tables import FleetInstanceRow, FleetSampleRow


def test_a_launch_whose_only_gpu_is_lost_is_terminated_and_replaced(sqlite_url: str) -> None:
    """Before the fix: the boot-timeout rule (fleet/stuck.py) judged only the cloud's status and
    whether the node answered. A node answering that its GPU is lost (`gpus_failing`, no
    utilisation) counted as working: flagged `unhealthy` in the views, never terminated, never
    replaced (no utilisation, no idle streak either), so the instance billed for good."""

    async def body() -> None:
        cloud = FakeCloud()
        cfg = {"min_instances": 1, "max_instances": 1, "boot_timeout_mins": 10}
        async with fleet(sqlite_url, cloud, action_cooldown_mins=0, **cfg) as ctx:
            await scan_for(ctx, 1)  # under its minimum: one launch
            (first,) = cloud.launches
            lost = next(i for i, x in cloud.instances_.items() if x.name == first)
            cloud.nodes[lost].gpu.fails = "NVMLError_GpuIsLost"
            await scan_for(ctx, 14)
            ended = [a for a in all_actions(ctx) if a.action_type == TERMINATE]
            assert [a.target_instance for a in ended] == [lost], [a.reason for a in ended]
            assert ended[0].status == "executed" and "not working" in ended[0].reason
            assert lost in cloud.terminations
            assert len(cloud.launches) == 2  # its replacement

    asyncio.run(body())


@pytest.mark.parametrize(
    ("gpu_util", "gpus_failing", "error"),
    [
        (40.0, 1, None),  # one GPU of two lost: the other still works, and says how much
        (None, 0, None),  # a MIG-enabled GPU: NVML gives no utilisation, and fails on nothing
    ],
    ids=["one-of-two-lost", "no-utilisation-reported"],
)
def test_a_node_with_a_gpu_that_reads_is_working(
    gpu_util: float | None, gpus_failing: int, error: str | None
) -> None:
    """The rule's other side: only a node that reads no GPU at all is judged not working."""
    now = datetime(2026, 3, 2, 13, 0, tzinfo=UTC)
    row = FleetInstanceRow(
        instance_id="i-1",
        name="provision_1",
        instance_type="gpu_2x_a100",
        region="us-east-1",
        ip="127.0.0.2",
        status="active",
        price_per_hour=2_580_000,
        gpus=2,
        launched_by="provision_1",
        first_seen_at=now - timedelta(hours=1),
        last_seen_at=now,
    )
    sample = FleetSampleRow(
        instance_id="i-1",
        taken_at=now,
        reachable=True,
        gpu_util=gpu_util,
        gpus_failing=gpus_failing,
        error=error,
    )
    cfg = FleetSettings(_env_file=None, boot_timeout_mins=10)  # type: ignore[call-arg]
    view = monitor.view(row, [sample], cfg, now)
    since = {"i-1": ("working", now - timedelta(hours=1))}
    assert stuck.proposals([view], cfg, now, since) == []
    assert since["i-1"][0] == "working"
