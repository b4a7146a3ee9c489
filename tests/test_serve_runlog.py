"""`procure serve` says what runs do (issue 21): one log line when a run starts, when a job
starts on a vendor, fails or completes; and the total spend across runs is one call away
(`GET /api/spend`, `procure spend`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import pytest

from procure.agent.worker import WorkerConfig
from procure.api.app import create_app
from procure.local import serve
from web_browser import chromium, screenshot_dir
from world import World


def test_serve_logs_each_run_event_and_totals_spend(
    world: World, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="procure.runs")
    server = serve(
        create_app(world.settings, world.store, worker=WorkerConfig(poll_interval_s=0.05))
    )
    try:
        started = httpx.post(
            f"{server.url}/api/agent-start",
            json={"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5},
            timeout=30,
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["_id"]
        deadline = time.monotonic() + 60
        status = "running"
        while status == "running" and time.monotonic() < deadline:
            status = httpx.get(f"{server.url}/api/runs/{run_id}", timeout=30).json()["run"][
                "status"
            ]
            time.sleep(0.1)
        assert status == "completed"
        spend = httpx.get(f"{server.url}/api/spend", timeout=30).json()
        with chromium() as browser:
            page = browser.new_page()
            page.goto(f"{server.url}/")
            shown = page.locator("#spend").inner_text()
            page.screenshot(path=str(screenshot_dir(tmp_path) / "runs-spend.png"))
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "procure.runs"]
    assert lines[0] == f"run {run_id} started: Fine-tune, budget $5.00"
    assert f"run {run_id}: Job started on gpu_vendor_1" in lines
    assert f"run {run_id}: Job failed" in lines  # vendor 1 fails part-way
    assert f"run {run_id}: Job started on gpu_vendor_2" in lines
    assert lines[-1] == f"run {run_id}: Job completed"
    assert all(run_id in line for line in lines)  # nothing else: one line per event
    assert spend["runs"] == 1 and spend["pending"] == 0
    assert spend["paid"] > 0 and spend["total"] == spend["paid"] + spend["fleet"]
    assert spend["windows"]["day"] >= spend["paid"]
    assert shown.startswith(f"Spent across all runs: ${spend['total']:.2f}")
