"""The fleet's rails, second look: what the controller does to the cloud is in
the audit trail and announced, a dry run takes no hold on any node (whose dead-man switch would
then stop it), and the spend keeps what a pod ran up once RunPod lists it at $0."""

from __future__ import annotations

import asyncio

import httpx

from fleet_fakes import FakeCloud
from fleet_mock_world import NODE_TOKEN, controller, launch, start_mock, statuses
from fleet_world import all_actions, fleet, outbox, scan_for
from procure.fleet import costs
from procure.fleet.controller import scan_once
from procure.fleet.policy import TERMINATE
from procure.store import fleet_repo
from test_fleet_on_runpod_and_vast import fleet as cloud_fleet
from test_fleet_on_runpod_and_vast import runpod_world


def test_a_duplicate_launch_the_controller_terminates_is_audited_and_announced(
    db_url: str,
) -> None:
    """Before the fix: the controller terminated the second instance of a launch that landed
    twice straight through the cloud, with no action, no audit entry and no Slack message: a
    billed instance vanished from the account and the audit trail said nothing of it."""

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud) as ctx:
            await scan_for(ctx, 18)
            (launch,) = all_actions(ctx)
            assert launch.status == "executed" and launch.target_instance
            late = cloud.add(util=0, name=launch.action_id)  # the lost answer's launch lands
            await scan_once(ctx)
            assert late in cloud.terminations
            ended = [a for a in all_actions(ctx) if a.action_type == TERMINATE]
            assert [(a.target_instance, a.status) for a in ended] == [(late, "executed")], (
                "the duplicate's termination is not among the fleet's actions"
            )
            audited = [
                e["action"]
                for e in outbox(ctx, "audit")
                if e["action"]["type"] == TERMINATE and e["action"]["target"] == late
            ]
            assert [a["status"] for a in audited] == ["executed"], "no audit entry"
            assert launch.action_id in audited[0]["reason"]
            said = [m["text"] for m in outbox(ctx, "slack")]
            assert any(t.startswith("✅ Executed: terminate_instance") for t in said), said
            with ctx.store.session() as s:
                row = fleet_repo.get_instance(s, late)
                assert row is not None and row.ended_at is not None, "still billing in the ledger"

    asyncio.run(body())


def test_a_dry_run_never_arms_the_nodes_dead_man_switch(sqlite_url: str) -> None:
    """Before the fix: a dry run (`procure fleet run --once`, the README's first look at what
    the fleet would do) took the dead-man lease on every node it read: once it ended, each
    node whose switch was set (GPU_WORKER_ON_ORPHAN) stopped itself, terminating its instance,
    although no controller had ever held it."""
    mock = start_mock()

    async def body() -> list[str]:
        ids = [await launch(mock, "by-hand-a"), await launch(mock, "by-hand-b")]
        mock.state.clock.advance(61)  # booted: their nodes answer
        async with controller(sqlite_url, mock, node_lease_s=2.0, dry_run=True) as ctx:
            ctx.dry_run = True
            for _ in range(3):
                result = await scan_once(ctx)
                assert result.error is None and result.instances == 2
        return ids

    try:
        ids = asyncio.run(body())
        port = mock.state.config.node_port
        with mock.state.lock:
            ips = [mock.state.instances[i].ip for i in ids]
        for instance_id, ip in zip(ids, ips, strict=True):
            lease = httpx.get(
                f"http://{ip}:{port}/lease",
                headers={"Authorization": f"Bearer {NODE_TOKEN}"},
                timeout=10,
            ).json()
            assert lease["state"] != "armed", (
                f"the dry run armed {instance_id}'s dead-man switch: {lease}"
            )
        assert set(statuses(mock).values()) == {"active"}
    finally:
        mock.stop()


def test_a_runpod_pod_that_exited_keeps_the_spend_it_ran_up(db_url: str) -> None:
    """Before the fix: RunPod lists an EXITED pod with `cost` 0.0 (its spec: "0.0 when EXITED");
    the scan copied that price onto the pod's instance-hours, so every hour the fleet's pod had
    run and been billed vanished from the fleet's spend (and from the global caps' windows)."""
    mock, cloud = runpod_world()

    async def body() -> None:
        async with cloud_fleet(
            db_url,
            mock,
            cloud,
            default_instance_type="SECURE:NVIDIA A40",
            region="EU-RO-1",
            min_instances=1,
            max_hourly_spend=100,
            action_cooldown_mins=5,
        ) as ctx:
            for _ in range(13):  # two hours, a scan each ten minutes
                await scan_once(ctx)
                mock.state.clock.advance(600)
            with mock.state.lock:
                (pod,) = list(mock.state.pods.values())
            mock.state.preempt(pod.id)  # the platform stops it: EXITED
            await scan_once(ctx)
            with mock.state.lock:
                billed = mock.state.billed(pod) / 1e6
            assert billed > 0.5, billed  # two hours of an A40
            with ctx.store.session() as s:
                spent = costs.cost_report(s, ctx.clock())["spend_today"]
                row = fleet_repo.get_instance(s, pod.id)
                assert row is not None and row.ended_at is not None
            assert spent >= 0.9 * billed, (
                f"RunPod billed ${billed:.2f} for pod {pod.id}; the fleet counts ${spent:.2f}"
            )

    try:
        asyncio.run(body())
    finally:
        mock.stop()
