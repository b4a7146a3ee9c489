"""The seeds' fault switches for `procure mock-vendor`: FAIL_RATE=0 means never fail, unset means
always (for FAIL_VENDOR_ID only)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from procure.local import mock_fail_rate
from procure.settings import Settings
from procure.store import repo
from world import SECRET, World, drive, state_of


@pytest.mark.parametrize(
    "env, vendor_id, rate",
    [
        ({"FAIL_VENDOR_ID": "gpu_vendor_1", "FAIL_RATE": "0"}, "gpu_vendor_1", 0.0),
        ({"FAIL_VENDOR_ID": "gpu_vendor_1"}, "gpu_vendor_1", 1.0),
        ({"FAIL_VENDOR_ID": "gpu_vendor_1", "FAIL_RATE": "0.3"}, "gpu_vendor_1", 0.3),
        ({"FAIL_VENDOR_ID": "gpu_vendor_1", "FAIL_RATE": "0.3"}, "gpu_vendor_2", 0.0),
        ({}, "gpu_vendor_1", 0.0),
    ],
)
def test_fail_rate_as_the_seeds_configure_it(
    env: dict[str, str], vendor_id: str, rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FAIL_VENDOR_ID", "FAIL_RATE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert mock_fail_rate(Settings(_env_file=None), vendor_id) == rate  # type: ignore[call-arg]


# The switch is the mock vendor's (a process that never opens the store); the run it serves is
# the agent's, on both stores everywhere else: SQLite alone here, one world and vendor fewer
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_mock_vendor_with_fail_rate_zero_never_fails(world: World) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "X402_FACILITATOR_URL": world.settings.facilitator_url,
        "GPU_VENDOR_SECRET": SECRET,
        "FAIL_VENDOR_ID": "gpu_vendor_1",
        "FAIL_RATE": "0",
        "MOCK_JOB_SECONDS": "0.5",
    }
    vendor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "procure.cli",
            "mock-vendor",
            "--vendor-id",
            "gpu_vendor_1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{url}/healthz").raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with world.store.session() as s:  # vendor 1 is now this process
            v = repo.get_vendor(s, "gpu_vendor_1")
            assert v is not None
            repo.save_vendor(s, v.model_copy(update={"endpoint": url}))
        run_id = world.new_run(budget=5.0)
        asyncio.run(drive(world.deps(), run_id))
    finally:
        vendor.terminate()
        vendor.wait(10)
    state = state_of(world, run_id)
    assert state.run.status == "completed"
    assert [(j.vendor_id, j.status) for j in state.jobs] == [("gpu_vendor_1", "completed")]
