"""A fleet controller whose nodes' dead-man lease (LAMBDA_LABS_NODE_LEASE_S) would lapse between
two of its scans refuses to start, saying why, before it arms a lease on any node; one that only
a late scan would lapse starts, with a warning."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_fakes import NODE_TOKEN, FakeCloud
from fleet_world import fleet
from procure.fleet.controller import FleetConflict, run_controller


async def node_lease(cloud: FakeCloud, instance_id: str) -> str:
    """The state of the node's dead-man lease (armed, or not)."""
    ip = cloud.instances_[instance_id].ip
    auth = {"Authorization": f"Bearer {NODE_TOKEN}"}
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"http://{ip}:{cloud.node_port}/lease", headers=auth)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["state"])


def run_one_scan(
    sqlite_url: str, health: dict[str, str], interval_s: float | None, **cfg: Any
) -> tuple[BaseException | None, str]:
    """`run_controller` as `fleet run` calls it, stopped after its first scan, on a fleet of
    one node: what it raised, and the node's lease then."""
    cloud = FakeCloud()
    node = cloud.add(util=50)

    async def body() -> tuple[BaseException | None, str]:
        async with fleet(sqlite_url, cloud, **cfg) as ctx:  # closes the cloud and its nodes
            stop = asyncio.Event()

            async def then_stop(_seconds: float) -> None:
                stop.set()

            try:
                await run_controller(
                    ctx, interval_s=interval_s, stop=stop, sleep=then_stop, health=health
                )
                raised = None
            except FleetConflict as exc:
                raised = exc
            return raised, await node_lease(cloud, node)

    return asyncio.run(body())


@pytest.mark.parametrize(
    ("settings", "interval_s"),
    [
        ({"node_lease_s": 30, "scan_interval_s": 60}, None),  # LAMBDA_LABS_SCAN_INTERVAL_S
        ({"node_lease_s": 60, "scan_interval_s": 60}, None),  # lapses as the next scan runs
        ({"scan_interval_s": 60}, 1800.0),  # `fleet run --interval 1800`, the lease's 900 s
    ],
)
def test_a_node_lease_that_lapses_between_scans_is_refused_at_start(
    sqlite_url: str, settings: dict[str, Any], interval_s: float | None
) -> None:
    """Before the fix: the controller started, armed each node's lease for less than the wait
    to its next scan, and every node then stopped its instance (GPU_WORKER_ON_ORPHAN) between
    two scans of a controller that runs, scan after scan."""
    health: dict[str, str] = {}
    refused, lease = run_one_scan(sqlite_url, health, interval_s, **settings)
    assert isinstance(refused, FleetConflict), refused
    assert "LAMBDA_LABS_NODE_LEASE_S" in str(refused)
    assert "lapses between scans" in str(refused)
    assert health["fleet-controller"].startswith("refused: ")
    assert lease != "armed"  # no scan ran: no node was leased


def test_a_node_lease_that_a_late_scan_would_lapse_starts_with_a_warning(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    health: dict[str, str] = {}
    with caplog.at_level(logging.WARNING, logger="procure.fleet.controller"):
        refused, lease = run_one_scan(sqlite_url, health, None, node_lease_s=90, scan_interval_s=60)
    assert refused is None and health["fleet-controller"] == "running"
    assert lease == "armed"
    assert any("lapses whenever a scan is late" in r.getMessage() for r in caplog.records)


def test_fleet_run_says_why_it_refuses_and_exits(tmp_path: Path) -> None:
    """`fleet run` with such a lease: one line saying why and what to set, exit status 1, and
    no scan of the cloud (its URL here answers nothing)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "PROCURE_"))}
    env = clean | {
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}",
        "PROCURE_HOME": str(tmp_path / "home"),
        "LAMBDA_API_KEY": "test-key",
        "LAMBDA_API_URL": "http://127.0.0.1:9",
        "LAMBDA_LABS_NODE_LEASE_S": "300",
        "LAMBDA_LABS_SCAN_INTERVAL_S": "600",
    }
    result = subprocess.run(
        [sys.executable, "-m", "procure.cli", "fleet", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    said = " ".join(result.stderr.split())
    assert "LAMBDA_LABS_NODE_LEASE_S (300 s) lapses between scans (600 s apart)" in said, said
    assert "1200 s or more" in said and "Traceback" not in result.stderr
