"""`procure demo clouds --json`: the agent on three mock clouds takes the cheapest interruptible
offer, loses it part-way, resumes from its checkpoint on another cloud and completes; nothing is
left running and what procure booked for cloud time is what the clouds billed, to the cent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(240)
def test_the_clouds_demo_tells_the_whole_story(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}  # no real cloud
    done = subprocess.run(
        [sys.executable, "-m", "procure.cli", "demo", "clouds", "--json"],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed"
    assert summary["providers"] == ["lambda", "runpod", "vast"]
    assert summary["preemptions"] >= 1
    assert 0 < summary["resumed_from_progress"] < 1
    assert summary["instances_left_running"] == 0
    assert summary["instances_launched"] >= 2
    assert abs(summary["booked_usd"] - summary["billed_usd"]) <= 0.01
    first, *rest = summary["jobs"]
    assert first["vendorId"].startswith("vast") and first["status"] == "failed"
    assert rest[-1]["status"] == "completed" and not rest[-1]["vendorId"].startswith("vast")
