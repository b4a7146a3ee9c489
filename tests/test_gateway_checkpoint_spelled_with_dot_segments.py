"""A job's `PROCURE_CHECKPOINT` line naming another buyer's checkpoint is refused however the path
is spelled: a `.` segment in a local path names the same file, so it does not hide the other
job's folder of the checkpoint store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from procure.gateway.instances import IGNORED
from test_gateway import GatewayWorld, job_status, wait_for
from test_gateway_renewals_checkpoints_and_status import _buy_with, _preempt, _sayer_world, _steps


@pytest.fixture
def worlds() -> Iterator[list[GatewayWorld]]:
    started: list[GatewayWorld] = []
    yield started
    for g in started:
        g.stop()


def test_another_buyers_checkpoint_behind_a_dot_segment_is_not_taken(
    tmp_path: Path, sqlite_url: str, worlds: list[GatewayWorld]
) -> None:
    """Before the fix: the gateway compared a job's checkpoint path with its checkpoint store's
    folder as spelled (only `~`, `file://` and doubled slashes undone), so another buyer's
    checkpoint written with a `/./` above the store's folder looked like a path outside the
    store: it was kept as this job's checkpoint (shown as its own) and, its instance lost, the
    replacement resumed from the other buyer's work (the node reads the `.` path as the same
    file)."""
    g = _sayer_world(tmp_path, sqlite_url)
    worlds.append(g)
    victim = _buy_with(g, "victim", {"train": _steps(400)})
    theirs = wait_for(lambda: job_status(g, victim).get("checkpointUrl"), 60)
    store = g.cfg.checkpoint_dir.rstrip("/")
    assert theirs.startswith(f"{store}/{victim}/"), theirs
    parent, folder = store.rsplit("/", 1)
    spelled = theirs.replace(f"{store}/", f"{parent}/./{folder}/", 1)
    assert Path(spelled).read_bytes() == Path(theirs).read_bytes()  # the same file
    hostile = _buy_with(
        g, "hostile", {"say": [f"PROCURE_CHECKPOINT {spelled}"], "hide": True, "train": _steps(200)}
    )
    wait_for(lambda: any("training 200 steps" in x for x in job_status(g, hostile)["logs"]), 60)
    shown = job_status(g, hostile)
    assert shown["checkpointUrl"] is None, "another buyer's checkpoint shown as this job's"
    assert any(IGNORED in line for line in shown["logs"]), shown["logs"][-5:]
    pods = {p["id"] for p in g.live_pods()}
    httpx.post(f"{g.url}/cancel-job", json={"jobId": victim}, headers=g.headers(), timeout=15)
    wait_for(lambda: len(g.live_pods()) == 1 and {p["id"] for p in g.live_pods()} < pods, 60)
    _preempt(g, hostile)
    done = wait_for(lambda: (s := job_status(g, hostile))["status"] == "completed" and s, 60)
    resumed = [line for line in done["logs"] if "resuming from" in line]
    assert resumed == [], f"resumed from another buyer's checkpoint: {resumed}"
