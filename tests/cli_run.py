"""`procure` run as a user runs it, for the CLI tests: a clean environment (none of the
developer's own settings), a directory of its own, and the check that a refusal is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Settings a developer's shell may hold: none may leak into these runs
OURS = (
    "PROCURE_",
    "LAMBDA_",
    "RUNPOD_",
    "VAST_",
    "X402_",
    "GPU_",
    "FAIL_",
    "FLEET_",
    "LLM_",
    "PLANNER_",
    "MOCK_",
    "VENDOR_",
    "SLACK_",
    "FIREWORKS_",
    "OPENAI_",
)


def cli_env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(OURS)}
    return {
        **clean,
        "COLUMNS": "200",
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}",
        "PROCURE_HOME": str(tmp_path / "home"),
        **extra,
    }


def procure(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, from a directory of their own (its `.env`, if any)."""
    return subprocess.run(
        [sys.executable, "-m", "procure.cli", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path, extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line(result: subprocess.CompletedProcess[str], *, naming: str) -> str:
    """The refusal's one line on stderr (`error: ...`, naming `naming`), never a traceback."""
    full = result.stdout + result.stderr
    out = full[-1500:]  # the end says what went wrong
    assert result.returncode != 0, out
    assert "Traceback" not in full, out
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert naming in lines[0], out
    return lines[0]
