"""A bill procure must compute itself (the provider's billing endpoint refused for good) is
computed by that provider's rule: RunPod and Vast.ai bill an instance from its creation, its boot
included, so the computed bill starts at the launch, never at the end of the boot (Lambda's
rule). Checked on the mock RunPod over HTTP: what procure books is at least what it billed."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import httpx
import pytest

from cloud_fakes import cloud_vendor, drive, make_deps, new_run, new_store, tmp_url
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.mock import start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.clouds.runpod.settings import RunPodSettings
from procure.local import free_port
from procure.models import PaymentStatus
from procure.store import repo

KEY = "mock-runpod-key"
TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"
BOOT_S = 2.0  # simulated = wall seconds (speed 1): the boot RunPod bills


@pytest.mark.timeout(120)
def test_a_computed_runpod_bill_counts_the_boot_it_billed(tmp_path: Path) -> None:
    """Before the fix: with RunPod's billing refused for good (a key without billing access),
    the job's bill is computed from when the pod was last seen booting (Lambda's rule: booting
    is free), so the two seconds of boot RunPod billed are never booked: the run's books say
    less than the provider's invoice."""
    mock = start_mock_cloud(
        RunPodMockConfig(
            api_key=KEY,
            speed=1,
            provision_s=BOOT_S / 2,
            start_s=BOOT_S / 2,
            node_port=free_port(),
        )
    )
    try:
        asyncio.run(_scenario(mock.url, tmp_path))
    finally:
        mock.stop()


async def _scenario(url: str, tmp_path: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = {"endpoints": ["billing"], "status": 403}  # for good: no `count`
    answer = await asyncio.to_thread(httpx.post, f"{url}/admin/faults", json=refused, headers=auth)
    assert answer.status_code == 200, answer.text
    client = RunPodCloud(RunPodSettings(RUNPOD_API_KEY=KEY, RUNPOD_API_URL=url))
    try:
        store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 5.0)])
        deps = make_deps(store, {}, boot_timeout_s=30.0, reserve_ahead_s=10.0)
        command = (sys.executable, str(TRAIN), "--steps", "20", "--step-time", "0.05")
        tuning = dataclasses.replace(deps.cloud, command=command, checkpoint_dir=str(tmp_path))
        deps = dataclasses.replace(deps, clouds={"runpod": client}, node_client=None, cloud=tuning)
        run_id = new_run(store, 100.0)
        status = await drive(deps, run_id, timeout_s=60)
        with store.session() as s:
            state = repo.load_state(s, run_id)
        assert state is not None
        assert status == "completed", [o.content for o in state.observations][-10:]
        assert any("cannot be read" in o.content for o in state.observations)  # computed
        answer = await asyncio.to_thread(httpx.get, f"{url}/admin/billing", headers=auth)
        billed = answer.json()["totalMicroUsd"]
        booked = sum(p.amount for p in state.payments if p.status == PaymentStatus.completed)
        assert billed > 0
        assert booked >= billed, f"RunPod billed {billed} micro-USD; procure booked {booked}"
    finally:
        await client.aclose()
