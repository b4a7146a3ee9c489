"""The `procure` command as a user runs it: a real subprocess against a store on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from world import World
from world import procure_cli as procure


@pytest.fixture
def env(world: World) -> dict[str, str]:
    return {
        "PROCURE_DATABASE_URL": world.settings.database_url,
        "PROCURE_HOME": str(world.settings.home),
        "GPU_VENDOR_SECRET": world.settings.gpu_vendor_secret.get_secret_value(),
        "X402_FACILITATOR_URL": world.settings.facilitator_url,
    }


def test_help_explains_every_command() -> None:
    out = procure("--help", env={}).stdout
    for command in ("demo", "serve", "facilitator", "mock-vendor", "vendors", "run"):
        assert command in out


def test_run_start_tick_status_list(env: dict[str, str], world: World) -> None:
    started = procure("run", "start", "--goal", "Fine-tune", "--budget", "5", env=env)
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["status"] == "running" and run["budgetTotal"] == 5.0

    ticked = procure("run", "tick", run["_id"], env=env)
    assert ticked.returncode == 0, ticked.stderr
    assert json.loads(ticked.stdout)["message"] == "Job started"

    status = json.loads(procure("run", "status", run["_id"], env=env).stdout)
    assert status["payments"][0]["status"] == "completed"
    assert status["run"]["budgetRemaining"] == 4.65  # unproven vendor 1: a $0.35 first slice

    listed = procure("run", "list", env=env).stdout
    assert run["_id"] in listed

    vendors = json.loads(procure("vendors", "list", "--json", env=env).stdout)
    assert [v["vendorId"] for v in vendors] == ["gpu_vendor_1", "gpu_vendor_2"]


def test_unknown_run_is_a_clear_error(env: dict[str, str]) -> None:
    result = procure("run", "status", "nope", env=env)
    assert result.returncode == 1
    assert "not found" in result.stderr and result.stdout == ""


def test_bad_budget_is_refused(tmp_path: Path) -> None:
    env = {"PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    result = procure("run", "start", "--goal", "x", "--budget", "-3", env=env)
    assert result.returncode == 2
    assert "budget" in (result.stdout + result.stderr).lower()
