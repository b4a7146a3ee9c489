"""The serverless entry driven cold: every request is served by a fresh app instance (its own
store handle, no pool, no worker, no agent loop) over one PostgreSQL, and a whole run — start,
scheduled ticks, an explicit tick, status, metrics — goes through, paying the mock vendor over
the local facilitator; only the store carries anything from one request to the next."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.api.serverless import create_serverless_app, serverless_store
from procure.local import serve
from world import POSTGRES_ENV, World, postgres_database, start_world


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    monkeypatch.setenv("PROCURE_CRON_BUDGET_S", "1.5")  # several scheduled calls per run
    monkeypatch.setenv("CRON_SECRET", "cron-secret")
    with postgres_database() as url:
        w = start_world(tmp_path, url)
        yield w
        w.stop()


def cold(world: World, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to a fresh instance of the serverless app, gone afterwards."""
    store = serverless_store(world.settings.database_url)
    server = serve(create_serverless_app(world.settings, store))
    try:
        return httpx.request(method, f"{server.url}{path}", timeout=60, **kwargs)
    finally:
        server.stop()
        store.dispose()


def test_a_whole_run_through_cold_instances(world: World) -> None:
    started = cold(
        world,
        "POST",
        "/api/agent-start",
        json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5.0},
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["_id"]

    refused = cold(world, "GET", "/api/cron/tick")
    assert refused.status_code == 401  # the schedule's secret guards it
    ticked = cold(world, "POST", "/api/agent-tick", json={"runId": run_id})
    assert ticked.status_code == 200 and ticked.json()["message"], ticked.text

    cron = {"Authorization": "Bearer cron-secret"}
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    calls = 0
    while time.monotonic() < deadline:
        answer = cold(world, "GET", "/api/cron/tick", headers=cron)
        assert answer.status_code == 200, answer.text
        calls += 1
        status = cold(world, "GET", "/api/agent-status", params={"runId": run_id}).json()
        if status["run"]["status"] != "running":
            break
    assert status["run"]["status"] == "completed", status["run"]
    assert calls >= 1
    assert [p["status"] for p in status["payments"]] == ["completed"] * len(status["payments"])
    assert status["payments"] and status["run"]["progress"] == 1.0

    listed = cold(world, "GET", "/api/runs", params={"limit": 1})
    assert [r["_id"] for r in listed.json()] == [run_id] and "link" not in listed.headers
    scraped = cold(world, "GET", "/metrics").text
    assert re.search(r'^procure_runs\{status="completed"\} 1\.0$', scraped, re.M), scraped
    paid = float(re.findall(r"^procure_paid_usd(?:_total)? (\S+)$", scraped, re.M)[0])
    assert paid == pytest.approx(sum(p["amount"] for p in status["payments"]))
    again = cold(world, "GET", "/api/cron/tick", headers=cron)
    assert again.json()["ticked"] == 0  # nothing due once the run has ended
