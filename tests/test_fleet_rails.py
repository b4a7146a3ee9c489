"""Every rail blocks with its reason (dry run, cooldown, instance cap, hourly spend cap, global
spend cap), nothing reaches the cloud, and the block is audited and announced; an action over
the confirmation threshold waits, and expires as rejected."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleet_fakes import FakeCloud
from fleet_world import all_actions, fleet, outbox, scan_for
from procure.store.ledger import SpendCaps

RAILS: dict[str, tuple[dict[str, Any], str]] = {
    "dry_run": ({"dry_run": True}, "dry run: nothing was sent to the cloud"),
    "instance_limit": ({"max_instances": 2}, "would exceed the 2 instance limit"),
    "spend_limit": ({"max_hourly_spend": 3.0}, "would exceed $3.00/hour limit"),
    "global_spend_cap": (
        {"caps": SpendCaps(per_hour=3_500_000)},
        "global spend cap per hour ($3.50) would be exceeded",
    ),
}


@pytest.mark.parametrize("rail", sorted(RAILS))
def test_each_rail_blocks_a_launch_with_its_reason(sqlite_url: str, rail: str) -> None:
    overrides, detail = RAILS[rail]

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        cloud.add(util=95)
        async with fleet(sqlite_url, cloud, **overrides) as ctx:
            await scan_for(ctx, 40)
            acts = all_actions(ctx)
            assert [(a.status, a.block_reason) for a in acts] == [("blocked", rail)]
            assert detail in (acts[0].error_message or "")
            assert cloud.launches == []
            text = outbox(ctx, "slack")[0]["text"]
            assert text.startswith("🚫 Action blocked: provision_instance") and detail in text
            entry = outbox(ctx, "audit")[0]
            assert entry["action"]["status"] == "blocked"
            assert entry["dry_run"] is (rail == "dry_run")

    asyncio.run(body())


def test_a_launch_whose_price_is_unknown_is_blocked(sqlite_url: str) -> None:
    """Before the fix: a type the catalogue priced at 0 (unknown) was proposed at $0/h, counted
    as free against every spend cap, and launched with no price ceiling."""

    async def body() -> None:
        cloud = FakeCloud(price=0)
        cloud.add(util=95)
        cloud.add(util=95)
        async with fleet(sqlite_url, cloud, max_hourly_spend=3.0) as ctx:
            await scan_for(ctx, 40)
            acts = all_actions(ctx)
            assert [(a.status, a.block_reason) for a in acts] == [("blocked", "spend_limit")]
            assert "price is unknown" in (acts[0].error_message or "")
            assert cloud.launches == []

    asyncio.run(body())


def test_cooldown_blocks_the_second_termination(db_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=2)
        cloud.add(util=4)
        cloud.add(util=60)
        async with fleet(db_url, cloud) as ctx:
            await scan_for(ctx, 32)
            # Both at the same scan: the first goes, the second meets the cooldown.
            acts = sorted(all_actions(ctx), key=lambda a: a.status, reverse=True)
            assert [(a.status, a.block_reason) for a in acts] == [
                ("executed", None),
                ("blocked", "cooldown"),
            ]
            assert "in cooldown: the last terminate_instance was 0 min ago" in (
                acts[1].error_message or ""
            )
            assert len(cloud.terminations) == 1
            await scan_for(ctx, 31)  # after the cooldown, the second one goes too
            assert len(cloud.terminations) == 2

    asyncio.run(body())


def test_over_the_threshold_waits_and_expires_as_rejected(db_url: str) -> None:
    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud, confirmation_threshold=1.0) as ctx:
            await scan_for(ctx, 17)
            acts = all_actions(ctx)
            assert [(a.status, a.needed_approval) for a in acts] == [("pending", True)]
            assert outbox(ctx, "slack")[0]["text"] == (
                "⚠️ Action requires confirmation: provision_instance (cost impact: $1.29/hour)"
            )
            await scan_for(ctx, 6)  # past the 5 minutes
            acts = all_actions(ctx)
            assert [(a.status, a.decided_by) for a in acts] == [("rejected", "timeout")]
            assert acts[0].error_message == "no confirmation within 5 min"
            assert cloud.launches == []

    asyncio.run(body())


def test_an_old_approval_expires_however_many_newer_ones_are_pending(db_url: str) -> None:
    """Before the fix: expiry read the newest 1,000 pending actions only; with more pending (a
    controller whose approvals nobody answers), the oldest one, first to expire, was never
    reached and stayed approvable long after its window ended."""
    from datetime import timedelta

    from procure.fleet import actions
    from procure.store import fleet_repo

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(db_url, cloud) as ctx:
            now = ctx.clock()
            with ctx.store.session() as s:
                # The oldest, its window ended hours ago, behind 1,000 newer ones still in
                # theirs: the newest 1,000 pending (the old page) hold no expired one at all.
                # (Newer ones past their window too would prove no more, and each expired one
                # costs a transition and its notice.)
                for k in range(1001):
                    at = now - timedelta(hours=3) if k == 0 else now - timedelta(seconds=1001 - k)
                    fleet_repo.add_action(
                        s,
                        action_id=f"provision_{k:05d}",
                        action_type="provision_instance",
                        reason="waiting for an approval",
                        status="pending",
                        needed_approval=True,
                        created_at=at,
                        expires_at=at + timedelta(hours=1),
                    )
            assert actions.expire(ctx) == 1
            with ctx.store.session() as s:
                oldest = fleet_repo.get_action(s, "provision_00000")
                assert oldest is not None and oldest.status == "rejected", oldest.status
                newest = fleet_repo.get_action(s, "provision_01000")
                assert newest is not None and newest.status == "pending", newest.status

    asyncio.run(body())
