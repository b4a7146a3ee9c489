"""The fleet controller on a fake cloud whose instances run real GPU nodes on loopback: it
provisions on sustained saturation, terminates on sustained idleness, keeps the minimum, renews
the nodes' dead-man leases, and survives cloud errors (recorded, backed off, never a crash)."""

from __future__ import annotations

import asyncio

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, outbox, scan_for
from procure.fleet.controller import scan_once
from procure.store import fleet_repo


def test_provisions_once_on_sustained_saturation(db_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        busy = [cloud.add(util=95), cloud.add(util=92)]
        async with fleet(db_url, cloud) as ctx:
            await scan_for(ctx, 15)  # minute 0..14: not yet sustained for 15 minutes
            assert cloud.launches == []
            await scan_for(ctx, 3)
            acts = all_actions(ctx)
            assert [(a.action_type, a.status) for a in acts] == [("provision_instance", "executed")]
            action = acts[0]
            assert cloud.launches == [action.action_id]  # named after the action: exactly once
            assert "All 2 instance(s) above 80% GPU" in action.reason
            assert float(action.cost_impact or 0) == 1.29
            with ctx.store.session() as s:
                launched = fleet_repo.get_instance(s, action.target_instance or "")
                assert launched is not None and launched.launched_by == action.action_id
            # The new instance is busy too (95%), but the cooldown holds the next launch.
            await scan_for(ctx, 20)
            assert len(cloud.launches) == 1
            assert [a.block_reason for a in all_actions(ctx)][1:] == ["cooldown"]
            # The controller holds a dead-man lease on every node it reads.
            for instance_id in busy:
                lease = cloud.lease(instance_id)
                assert lease["state"] == "armed" and lease["holder"] == ctx.node_holder
            audit = outbox(ctx, "audit")
            assert audit[0]["action"]["status"] == "executed" and audit[0]["dry_run"] is False
            slack = outbox(ctx, "slack")
            assert slack[0]["text"].startswith("✅ Executed: provision_instance - All 2")
            assert slack[0]["blocks"][0]["text"]["text"] == slack[0]["text"]

    asyncio.run(body())


def test_terminates_on_sustained_idleness_never_below_minimum(db_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        idle_a, idle_b = cloud.add(util=5), cloud.add(util=3)
        async with fleet(db_url, cloud, min_instances=1, action_cooldown_mins=0) as ctx:
            results = await scan_for(ctx, 12)
            assert any("idle 11 min" in r["text"] for r in results[-1].recommendations)
            assert any("saves $1.29/h" in r["text"] for r in results[-1].recommendations)
            await scan_for(ctx, 25)
            acts = all_actions(ctx)
            assert [(a.action_type, a.status) for a in acts] == [("terminate_instance", "executed")]
            assert acts[0].target_instance in (idle_a, idle_b)
            assert acts[0].reason.startswith("Sustained low GPU usage (")
            assert float(acts[0].cost_impact or 0) == -1.29
            assert len(cloud.live()) == 1  # the minimum stays
            with ctx.store.session() as s:
                ended = fleet_repo.get_instance(s, acts[0].target_instance or "")
                assert ended is not None and ended.ended_at is not None

    asyncio.run(body())


def test_cloud_errors_are_recorded_backed_off_and_survived(sqlite_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(sqlite_url, cloud) as ctx:
            cloud.fail("instances", "provider")
            first = await scan_once(ctx)
            assert first.error and "ProviderError" in first.error
            with ctx.store.session() as s:
                lease = fleet_repo.lease_row(s, ctx.lease_name)
                assert lease is not None and "injected provider" in (lease.last_error or "")
            ctx.clock.advance(seconds=30)  # type: ignore[attr-defined]
            assert "backing off" in ((await scan_once(ctx)).error or "")
            cloud.fail("instances", "auth")  # a bad key: recorded, no crash
            ctx.clock.advance(minutes=2)  # type: ignore[attr-defined]
            assert "AuthError" in ((await scan_once(ctx)).error or "")
            ctx.clock.advance(minutes=5)  # type: ignore[attr-defined]
            # Launches: provider trouble is retried (found by name first), capacity fails it.
            cloud.fail("launch", "provider")
            await scan_for(ctx, 17)
            acts = all_actions(ctx)
            assert [a.status for a in acts] == ["executing"]
            assert "injected provider" in (acts[0].error_message or "")
            await scan_for(ctx, 3)  # after its back-off (2 scan intervals)
            acts = all_actions(ctx)
            assert [a.status for a in acts] == ["executed"] and acts[0].attempts == 2
            assert cloud.launches == [acts[0].action_id]

    asyncio.run(body())


def test_capacity_refusal_fails_the_action_and_says_so(sqlite_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=99)
        async with fleet(sqlite_url, cloud) as ctx:
            cloud.fail("launch", "capacity")
            await scan_for(ctx, 17)
            acts = all_actions(ctx)
            assert [(a.status, a.error_message) for a in acts] == [
                ("failed", "CapacityError: injected capacity")
            ]
            assert cloud.launches == []
            assert outbox(ctx, "slack")[-1]["text"] == (
                "❌ Action failed: provision_instance - CapacityError: injected capacity"
            )

    asyncio.run(body())


def test_a_duplicate_launch_is_terminated_and_the_recorded_one_kept(sqlite_url: str) -> None:
    # Lambda's launch has no idempotency key: a launch whose answer was lost may land after
    # its retry, leaving two instances named after one action. The controller keeps one.
    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(sqlite_url, cloud) as ctx:
            await scan_for(ctx, 18)
            (action,) = all_actions(ctx)
            assert action.status == "executed" and action.target_instance
            late = cloud.add(util=0, name=action.action_id)  # the lost answer's launch lands
            result = await scan_once(ctx)
            assert result.carried_out == [f"{late} terminated (a duplicate launch)"]
            live = {i.id for i in cloud.live()}
            assert action.target_instance in live and late not in live

    asyncio.run(body())
