"""Warnings before caps, on both stores: a run crossing 80 % of its budget warns exactly once (one
observation, one Slack and one webhook message delivered through the outbox, the metric), however
often it is checked; the global ledger's windows and the fleet's caps warn once per period; and
delivery rides out a webhook that answers 503 or 429 first."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from procure import warnings
from procure.api.app import create_app
from procure.fleet import cap_warnings
from procure.fleet.settings import FleetSettings
from procure.local import LocalServer, serve
from procure.models import usd_to_micros, utcnow
from procure.store import fleet_repo, ledger, open_store
from procure.store.fleet_tables import OutboxRow
from world import World, drive, start_world, state_of


@pytest.fixture
def plain_world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """The local world with both vendors healthy: a run pays once ($1.40) and completes."""
    w = start_world(tmp_path, db_url)
    yield w
    w.stop()


class Hook:
    """A loopback webhook that records what it is sent, answering `fail_first` statuses first."""

    def __init__(self, fail_first: list[int] | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_first = list(fail_first or [])
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> JSONResponse:
            if self.fail_first:
                status = self.fail_first.pop(0)
                return JSONResponse({"error": "busy"}, status, headers={"Retry-After": "0"})
            self.received.append(await request.json())
            return JSONResponse({"ok": True})

        self.server: LocalServer = serve(app)
        self.url = f"{self.server.url}/hook"


def eventually(condition: Callable[[], Any], what: str, within_s: float = 30) -> Any:
    deadline = time.monotonic() + within_s
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)
    return found


def warning_rows(world: World) -> list[warnings.BudgetWarningRow]:
    with world.store.session() as s:
        return list(s.query(warnings.BudgetWarningRow).order_by(warnings.BudgetWarningRow.id))


def queued(world: World, channel: str) -> list[OutboxRow]:
    with world.store.session() as s:
        return list(s.query(OutboxRow).filter(OutboxRow.channel == channel))


def scrape(world: World) -> str:
    # No background sweep: this test sweeps by hand with its own threshold and caps.
    server = serve(create_app(world.settings, world.store, budget_warnings=False))
    try:
        return httpx.get(f"{server.url}/metrics", timeout=15).text
    finally:
        server.stop()


def deliver(world: World, slack: Hook, hook: Hook) -> int:
    cfg = warnings.WarningSettings(
        SLACK_WEBHOOK_URL=slack.url, PROCURE_WARNING_WEBHOOK_URL=hook.url
    )
    return asyncio.run(cap_warnings.deliver_all(world.store, cfg))


def test_a_run_crossing_80_percent_of_its_budget_warns_exactly_once(plain_world: World) -> None:
    world = plain_world
    run_id = world.new_run(budget=1.6)  # one payment of $1.40: 87.5 % of the budget
    asyncio.run(drive(world.deps(), run_id))
    state = state_of(world, run_id)
    assert state.run.status == "completed"

    # Checked again by a fresh process (its memory empty) and by two workers at once: no more.
    warnings._WARNED.clear()
    total, remaining = state.run.budget_total, state.run.budget_remaining
    results: list[bool] = []

    def check() -> None:
        results.append(warnings.check_run(world.store, run_id, total, remaining, 0.8))

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [False, False]

    (row,) = warning_rows(world)
    assert (row.scope, row.budget, row.spent, row.cap) == ("run", run_id, 1_400_000, 1_600_000)
    said = [
        o.content for o in state_of(world, run_id).observations if "Budget warning" in o.content
    ]
    assert said == [
        f"Budget warning: Run {run_id}'s budget is at 88% ($1.40 of $1.60), past its warning "
        "threshold of 80%"
    ]

    slack, hook = Hook(fail_first=[503]), Hook(fail_first=[429])
    try:

        def both_sent() -> bool:
            deliver(world, slack, hook)
            return len(slack.received) + len(hook.received) == 2

        eventually(both_sent, "both notifications delivered after a 503 and a 429")
        deliver(world, slack, hook)  # nothing left to send
    finally:
        slack.server.stop()
        hook.server.stop()
    assert [m["text"] for m in slack.received] == ["⚠️ " + said[0]]
    (sent,) = hook.received
    assert sent["event"] == "budget_warning" and sent["scope"] == "run"
    assert (sent["budget"], sent["spent"], sent["cap"], sent["threshold"]) == (
        run_id,
        1.4,
        1.6,
        0.8,
    )

    text = scrape(world)
    assert re.search(r'^procure_budget_warnings_total\{scope="run"\} 1\.0$', text, re.M), text
    assert re.search(r"^procure_runs_over_warning 0\.0$", text, re.M)  # it has completed


def test_a_run_below_its_threshold_does_not_warn(plain_world: World) -> None:
    run_id = plain_world.new_run(budget=5.0)  # $1.40 of $5: 28 %
    asyncio.run(drive(plain_world.deps(), run_id))
    assert warning_rows(plain_world) == []
    assert queued(plain_world, warnings.WEBHOOK) == []


def test_ledger_windows_and_fleet_caps_warn_once_per_period(plain_world: World) -> None:
    world = plain_world
    run_id = world.new_run(budget=5.0)
    asyncio.run(drive(world.deps(), run_id))  # $1.40 spent in the last hour
    caps = ledger.SpendCaps(per_hour=usd_to_micros(1.6), per_day=usd_to_micros(100.0))
    fleet = FleetSettings(LAMBDA_LABS_MAX_INSTANCES=2, LAMBDA_LABS_MAX_HOURLY_SPEND=10.0)
    now = utcnow()
    with world.store.session() as s:
        fleet_repo.upsert_instance(
            s,
            now,
            instance_id="i-1",
            name="n1",
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip=None,
            status="active",
            price_per_hour=usd_to_micros(1.29),
        )
    crossed = cap_warnings.sweep(world.store, 0.5, caps, fleet, now)
    assert [(c.scope, c.budget) for c in crossed] == [("ledger", "hour"), ("fleet", "instances")]
    assert cap_warnings.sweep(world.store, 0.5, caps, fleet, now) == []  # once per period
    # The hour counts the instance's started hour too (the ledger's rule): $1.40 + $1.29.
    assert warnings.LEVELS.used[("ledger", "hour")] == pytest.approx(2.69 / 1.6, rel=0.01)
    assert warnings.LEVELS.used[("fleet", "hourly_spend")] == pytest.approx(0.129)
    audit = [m.payload["warning"] for m in queued(world, "audit") if "warning" in m.payload]
    assert [(a["scope"], a["budget"]) for a in audit] == [
        ("ledger", "hour"),
        ("fleet", "instances"),
    ]
    assert len(queued(world, warnings.SLACK)) == 2 and len(queued(world, warnings.WEBHOOK)) == 2

    text = scrape(world)
    assert re.search(r'^procure_budget_warnings_total\{scope="ledger"\} 1\.0$', text, re.M)
    assert re.search(r'^procure_budget_warnings_total\{scope="fleet"\} 1\.0$', text, re.M)
    assert 'procure_budget_used_ratio{budget="instances",scope="fleet"} 0.5' in text
    assert re.search(r"^procure_budget_warning_threshold 0\.5$", text, re.M)
    with world.store.session() as s:
        recent = warnings.recent(s)
    assert [(r["scope"], r["budget"], r["unit"]) for r in recent] == [
        ("fleet", "instances", "count"),
        ("ledger", "hour", "usd"),
    ]
    assert recent[0]["text"] == (
        "Budget warning: Fleet cap instances is at 50% (1 of 2), past its warning threshold of 50%"
    )


def test_messages_without_a_destination_wait_a_day_for_one_then_go(plain_world: World) -> None:
    """A process without the webhook's URL leaves a warning for one that has it (they share
    the store), but nothing waits for good: a day later it is dropped, saying why."""
    world = plain_world
    day_ago = utcnow() - timedelta(seconds=warnings.UNSENT_S + 60)
    with world.store.session() as s:
        warnings.record(s, warnings.Crossing("ledger", "day", "2026-01-01", 9, 10, 0.8), utcnow())
        warnings.record(s, warnings.Crossing("ledger", "day", "2025-12-31", 9, 10, 0.8), day_ago)
    delivered = asyncio.run(cap_warnings.deliver_all(world.store, warnings.WarningSettings()))
    assert delivered == 0
    for channel in (warnings.SLACK, warnings.WEBHOOK):
        new, old = sorted(queued(world, channel), key=lambda m: m.created_at, reverse=True)
        assert new.delivered_at is None  # kept for a process that has the URL
        assert old.delivered_at is not None and "no destination" in (old.last_error or "")


@pytest.mark.parametrize("value", ["0", "1.5", "nan", "inf", "-0.2", "abc"])
def test_the_threshold_is_a_finite_fraction(value: str) -> None:
    with pytest.raises(ValueError):
        warnings.WarningSettings(PROCURE_WARNING_THRESHOLD=value)
    with pytest.raises(ValueError):
        FleetSettings(PROCURE_WARNING_THRESHOLD=value)
    assert warnings.WarningSettings(PROCURE_WARNING_THRESHOLD="1").threshold == 1.0


def test_the_background_task_sweeps_and_delivers(sqlite_url: str) -> None:
    """What `procure serve` runs: the fleet at its instance cap warns, and the warning reaches
    the generic webhook without anyone calling anything."""
    store = open_store(sqlite_url)
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            utcnow(),
            instance_id="i-9",
            name="n9",
            instance_type="gpu_1x_a100",
            region="us-east-1",
            ip=None,
            status="active",
            price_per_hour=usd_to_micros(1.29),
        )
    hook = Hook()
    cfg = warnings.WarningSettings(PROCURE_WARNING_WEBHOOK_URL=hook.url)
    fleet = FleetSettings(LAMBDA_LABS_MAX_INSTANCES=1)

    async def body() -> None:
        task = asyncio.create_task(
            cap_warnings.run_warnings(store, cfg, ledger.SpendCaps(), fleet, every_s=0.05)
        )
        try:
            deadline = time.monotonic() + 30
            while not hook.received and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # a few more sweeps: still one
        finally:
            task.cancel()

    try:
        asyncio.run(body())
    finally:
        hook.server.stop()
        store.dispose()
    assert [(m["scope"], m["budget"], m["spent"], m["cap"]) for m in hook.received] == [
        ("fleet", "instances", 1, 1)
    ]
