"""`procure fleet demo` as a user runs it: a subprocess that tells the whole story (a provision
that waited for approval and was approved, terminations of idle instances, the Slack messages
from the local receiver) and ends with the seed's action summary JSON, exit 0."""

from __future__ import annotations

import json

from world import procure_cli as procure


def test_fleet_demo_tells_the_story_and_ends_with_the_summary() -> None:
    result = procure("fleet", "demo", env={})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    slack = [line.split("slack ▸ ", 1)[1] for line in out.splitlines() if "slack ▸ " in line]
    assert any(s.startswith("⚠️ Action requires confirmation: provision_instance") for s in slack)
    assert any(s.startswith("✅ Executed: provision_instance - All 1 instance(s)") for s in slack)
    assert any(s.startswith("✅ Executed: terminate_instance - Sustained low GPU") for s in slack)
    assert any(s.startswith("🚫 Action blocked: provision_instance") for s in slack)
    assert out.count("operator approves provision_") == 1

    summary = json.loads(out[out.rindex("\n{") :])  # the summary JSON ends it
    assert summary["actions_by_type"]["provision_instance"] >= 1
    assert summary["actions_by_type"]["terminate_instance"] >= 1
    assert summary["failed_actions"] == 0 and summary["pending_confirmations"] == 0
    assert summary["instances_running"] == 0  # the idle instances were let go
    assert summary["safety_blocks"]  # the rails showed themselves
