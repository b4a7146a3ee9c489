"""The fleet controller end to end on the real mock Lambda Cloud, through `LambdaCloud` over HTTP:
it provisions when the workload saturates the pool and terminates what falls idle; its nodes
stop their own instances once it is gone (the dead-man switch); and every cloud error the mock
can inject is recorded and backed off, never a crash, never a duplicate launch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fleet_mock_world import (
    controller,
    lambda_cloud,
    launch,
    minutes,
    start_mock,
    statuses,
)
from fleet_world import all_actions
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.controller import scan_once


def eventually(condition: Callable[[], Any], what: str, within_s: float = 30) -> Any:
    deadline = time.monotonic() + within_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)
    return value


def test_provisions_on_saturation_and_terminates_idle_instances(db_url: str) -> None:
    # Four 10-minute jobs at minute 1.5 on one GPU: saturated, with a queue, for 40 minutes.
    mock = start_mock([JobSpec(90.0, 1, 600.0) for _ in range(4)])

    async def body() -> None:
        await launch(mock, "by-hand")
        async with controller(
            db_url,
            mock,
            high_usage_duration_mins=3,
            low_usage_duration_mins=5,
            action_cooldown_mins=0,
            max_instances=2,
        ) as ctx:
            await minutes(ctx, mock, 8)
            acts = all_actions(ctx)
            assert [(a.action_type, a.status) for a in acts][:1] == [
                ("provision_instance", "executed")
            ]
            provision = acts[0]
            assert "All 1 instance(s) above 80% GPU" in provision.reason
            # Launched through Lambda's API, named after the action (exactly once).
            assert statuses(mock)[provision.action_id] in ("booting", "active")
            assert mock.state.launches == 2
            # The new instance takes queued work; when the burst is done both fall idle and go.
            await minutes(ctx, mock, 35)
            done = [(a.action_type, a.status) for a in all_actions(ctx) if a.status == "executed"]
            assert done.count(("terminate_instance", "executed")) == 2
            assert set(statuses(mock).values()) <= {"terminating", "terminated"}
            assert mock.figures()["completed"] == 4
            assert mock.state.launches == 2  # never launched twice

    try:
        asyncio.run(body())
    finally:
        mock.stop()


def test_nodes_stop_their_instances_when_the_controller_is_gone(sqlite_url: str) -> None:
    mock = start_mock()

    async def body() -> None:
        first, second = await launch(mock, "a"), await launch(mock, "b")
        async with controller(sqlite_url, mock, node_lease_s=2.0) as ctx:
            mock.state.clock.advance(61)  # booted
            # While it scans, the controller renews its lease on every node.
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                await scan_once(ctx)
                await asyncio.sleep(0.2)
            assert set(statuses(mock).values()) == {"active"}
        # The controller is gone: the leases lapse and each node terminates its own instance.
        return first, second

    asyncio.run(body())
    try:
        eventually(
            lambda: set(statuses(mock).values()) <= {"terminating", "terminated"},
            "both orphaned instances stop themselves",
        )
        assert mock.state.launches == 2
    finally:
        mock.stop()


def test_cloud_errors_are_recorded_backed_off_and_never_duplicate_a_launch(
    sqlite_url: str,
) -> None:
    # One long job: saturated all along, once the instance is up. It boots for 20 minutes, so
    # nothing is proposed while the listing errors play out.
    mock = start_mock([JobSpec(0.0, 1, 36_000.0)], boot_s=1200)
    admin = {"Authorization": "Bearer mock-key-e2e"}

    def faults(**values: Any) -> None:
        import httpx

        httpx.post(f"{mock.url}/admin/faults", json=values, headers=admin).raise_for_status()

    async def body() -> None:
        await launch(mock, "by-hand")
        async with controller(
            sqlite_url,
            mock,
            timeout_s=1.5,  # not so short that a loaded machine looks like a hang
            high_usage_duration_mins=2,
            action_cooldown_mins=0,
            confirmation_timeout_mins=3,
            max_instances=5,
        ) as ctx:

            async def refused_listing(expect: str) -> None:
                result = await scan_once(ctx)
                assert result.error and expect in result.error, result.error
                assert ctx.backoff_until is not None
                mock.state.clock.advance(30)
                assert "backing off" in ((await scan_once(ctx)).error or "")
                faults()  # cleared; past the back-off the controller carries on
                mock.state.clock.advance(
                    (ctx.backoff_until - ctx.clock()).total_seconds() + 1  # type: ignore[operator]
                )
                assert (await scan_once(ctx)).error is None

            # Listing the fleet: provider trouble, a 500, garbage, a wrong shape, a hang.
            faults(provider_error=True, endpoints=["instances"])
            await refused_listing("ProviderError")
            faults(error500=True, endpoints=["instances"])
            await refused_listing("ProviderError")
            faults(garbage=True, endpoints=["instances"])
            await refused_listing("no JSON")
            faults(wrong_shape=True, endpoints=["instances"])
            await refused_listing("ProviderError")
            faults(hang_s=4.0, endpoints=["instances"])
            await refused_listing("in time")
            faults(account_inactive=True, endpoints=["instances"])
            await refused_listing("inactive")
            # A wrong key (401): recorded as such, the controller carries on.
            good, ctx.cloud = ctx.cloud, lambda_cloud(mock, key="wrong")
            assert "AuthError" in ((await scan_once(ctx)).error or "")
            await ctx.cloud.aclose()  # type: ignore[attr-defined]
            ctx.cloud, ctx.backoff_until, ctx.cloud_failures = good, None, 0

            # Launches refused for capacity, then for quota: each fails its action, said why.
            mock.state.clock.advance(1201 - mock.state.clock.now())  # the instance is up
            faults(refuse_capacity=True, endpoints=["launch"])
            await minutes(ctx, mock, 3)
            faults(refuse_quota=True, endpoints=["launch"])
            await minutes(ctx, mock, 4)
            failed = [a.error_message or "" for a in all_actions(ctx) if a.status == "failed"]
            assert any(e.startswith("CapacityError") for e in failed), failed
            assert any(e.startswith("QuotaError") for e in failed), failed
            assert mock.state.launches == 1

            # A launch whose answer never comes (it hangs past the deadline, then happens):
            # the action stays executing, and its retry finds the instance by name.
            faults(hang_s=3.0, endpoints=["launch"])
            for _ in range(6):
                await minutes(ctx, mock, 1)
                waiting = [a for a in all_actions(ctx) if a.status == "executing"]
                if waiting:
                    break
            assert len(waiting) == 1 and "in time" in (waiting[0].error_message or "")
            faults()
            eventually(lambda: mock.state.launches == 2, "the hung launch lands at the cloud")
            await minutes(ctx, mock, 3)
            executed = [a for a in all_actions(ctx) if a.action_id == waiting[0].action_id]
            assert executed[0].status == "executed"
            assert mock.state.launches == 2  # found by name, not launched again
            assert statuses(mock)[waiting[0].action_id] in ("booting", "active")

    try:
        asyncio.run(body())
    finally:
        mock.stop()
