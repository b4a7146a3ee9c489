"""The `procure` command on bad input: one clear line and a non-zero exit, never a traceback,
and the API's limits (the same StartRequest schema) on `run start`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from world import procure_cli as procure


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'procure.db'}",
        "PROCURE_HOME": str(tmp_path / "home"),
    }


def _one_line_error(result, code: int) -> str:  # type: ignore[no-untyped-def]
    out = result.stdout + result.stderr
    assert result.returncode == code, out
    assert "Traceback" not in out, out
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--budget", "1e308"], "--budget: Input should be less than or equal to 1000000"),
        (["--budget", "inf"], "--budget: Input should be a finite number"),
        (["--budget", "nan"], "--budget: Input should be a finite number"),
        (["--budget", "-1"], "--budget: Input should be greater than or equal to 0.000001"),
        (["--budget", "0.0000001"], "--budget"),
        (["--budget", "5", "--hours", "1e9"], "--hours: Input should be less than or equal to 720"),
        (
            ["--budget", "5", "--checkpoint-every", "1e-300", "--deadline-hours", "-1"],
            "--checkpoint-every: Input should be greater than or equal to 0.01; --deadline-hours",
        ),
    ],
)
def test_run_start_outside_the_api_limits_is_one_line(
    env: dict[str, str], args: list[str], mentions: str
) -> None:
    result = procure("run", "start", "--goal", "x", *args, env=env)
    line = _one_line_error(result, 2)
    assert line.startswith("error: invalid run: ") and mentions in line
    assert result.stdout == ""


def test_run_start_rounds_the_budget_down_and_nothing_is_started_on_error(
    env: dict[str, str],
) -> None:
    assert procure("run", "start", "--goal", "x", "--budget", "inf", env=env).returncode == 2
    started = procure("run", "start", "--goal", "x", "--budget", "4.9999995", env=env)
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["budgetTotal"] == 4.999999 and run["budgetRemaining"] == 4.999999
    listed = procure("run", "list", env=env).stdout
    assert listed.count("running") == 1  # the refused run was never created


def test_unknown_runs_are_one_clear_line(env: dict[str, str]) -> None:
    for command in ("status", "tick"):
        result = procure("run", command, "no-such-run", env=env)
        assert result.returncode == 1
        out = result.stdout + result.stderr
        assert "Traceback" not in out
        assert out.strip() == "error: run no-such-run not found"


def test_a_store_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    for url, says in [
        ("not-a-url", "Could not parse"),
        (f"sqlite:///{tmp_path / 'missing' / 'dir' / 'p.db'}", "unable to open database file"),
    ]:
        result = procure("run", "list", env={"PROCURE_DATABASE_URL": url})
        line = _one_line_error(result, 1)
        assert line.startswith("error: the store (") and says in line


def test_a_bad_setting_is_one_line(env: dict[str, str]) -> None:
    result = procure("run", "tick", "x", env={**env, "PROCURE_API_LEASE_S": "0"})
    line = _one_line_error(result, 1)
    assert "PROCURE_API_LEASE_S" in line


def test_run_list_limit_is_bounded(env: dict[str, str]) -> None:
    for limit in ("0", "100000000000000000000"):
        result = procure("run", "list", "--limit", limit, env=env)
        assert result.returncode == 2
        assert "Traceback" not in result.stdout + result.stderr
        assert "--limit" in result.stderr
