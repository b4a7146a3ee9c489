"""A fleet launch the cloud stopped but keeps (a RunPod pod EXITED, a Vast.ai instance stopped) is
never destroyed with its disk, and is announced: once (in the audit trail and on Slack), saying it
still bills its disk and how to end it, again only as a weekly reminder, never every scan. Real
controller, store (SQLite and PostgreSQL) and mock clouds on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

from fleet_world import outbox
from procure.fleet.context import FleetContext
from procure.fleet.controller import scan_once
from test_fleet_lost_paused_and_lease_lapsed_mid_scan import StoppedOnVast
from test_fleet_on_runpod_and_vast import fleet as cloud_fleet
from test_fleet_on_runpod_and_vast import runpod_world, vast_world


async def _minutes(ctx: FleetContext, mock: Any, n: int) -> None:
    for _ in range(n):
        await scan_once(ctx)
        mock.state.clock.advance(60)


def _kept(ctx: FleetContext) -> tuple[list[dict[str, Any]], list[str]]:
    """The audit trail's announcements of kept instances, and the Slack texts saying so."""
    audit = [e["kept"] for e in outbox(ctx, "audit") if "kept" in e]
    slack = [m["text"] for m in outbox(ctx, "slack") if "Kept:" in m.get("text", "")]
    return audit, slack


def test_a_runpod_pod_kept_exited_is_announced_once_with_how_to_end_it(db_url: str) -> None:
    """Before the fix: the controller kept the EXITED pod (rightly: its disk may hold work) and
    said nothing; the operator paid for its volume without being told."""
    mock, cloud = runpod_world()

    async def body() -> None:
        async with cloud_fleet(db_url, mock, cloud, default_instance_type="SECURE:NVIDIA A40",
                               region="EU-RO-1", min_instances=1, max_hourly_spend=100,
                               high_gpu_threshold=100, boot_timeout_mins=10,
                               action_cooldown_mins=0) as ctx:  # fmt: skip
            ctx.slack = True
            await _minutes(ctx, mock, 5)
            assert _kept(ctx) == ([], [])  # running: nothing to say
            with mock.state.lock:
                (pod,) = list(mock.state.pods.values())
            mock.state.preempt(pod.id)  # stopped: RunPod lists it EXITED
            await _minutes(ctx, mock, 30)
            audit, slack = _kept(ctx)
            assert [e["instance"] for e in audit] == [pod.id], audit  # once, not every scan
            assert f"runpodctl remove pod {pod.id}" in audit[0]["to_end"]
            (text,) = slack
            assert "still bills its disk" in text and f"runpodctl remove pod {pod.id}" in text
            with mock.state.lock:
                assert not pod.deleted  # kept, as before
            mock.state.clock.advance(8 * 24 * 3600)  # a week on, still EXITED: reminded once
            await _minutes(ctx, mock, 3)
            audit, slack = _kept(ctx)
            assert [e["instance"] for e in audit] == [pod.id, pod.id] and len(slack) == 2

    try:
        asyncio.run(body())
    finally:
        mock.stop()


def test_a_vast_instance_kept_stopped_is_announced_once(sqlite_url: str) -> None:
    """Before the fix: a fleet launch Vast.ai paused (its storage still billed) was kept and
    never mentioned."""
    transport = StoppedOnVast()
    mock, cloud = vast_world(transport=transport, boot_s=60)

    async def body() -> None:
        async with cloud_fleet(sqlite_url, mock, cloud, default_instance_type="vast_1x_RTX4090",
                               region="California, US", min_instances=1, max_hourly_spend=100,
                               high_gpu_threshold=100, boot_timeout_mins=10,
                               action_cooldown_mins=0) as ctx:  # fmt: skip
            await _minutes(ctx, mock, 5)
            (stopped,) = sorted(mock.state.instances)
            transport.stopped[stopped] = ("stopped", "running")  # paused for its balance
            await _minutes(ctx, mock, 30)
            audit, slack = _kept(ctx)
            assert [e["instance"] for e in audit] == [str(stopped)], audit
            assert f"vastai destroy instance {stopped}" in audit[0]["to_end"]
            assert slack == []  # no webhook configured: the audit trail alone
            with mock.state.lock:
                assert mock.state.instances[stopped].destroyed_at is None

    try:
        asyncio.run(body())
    finally:
        mock.stop()
