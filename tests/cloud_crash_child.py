"""The agent as a child process for the cloud crash test: ticks one run against the mock RunPod
(served by the parent) until it ends; `PROCURE_CRASH_AT` kills it at a named crash point.

    python tests/cloud_crash_child.py DB_URL RUNPOD_URL RUN_ID CHECKPOINT_DIR
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from eth_account import Account

from procure.agent.deps import AgentDeps, CloudTuning
from procure.agent.tick import tick
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.settings import RunPodSettings
from procure.models import TERMINAL_RUN_STATUSES
from procure.payments.settlements import FacilitatorLedger
from procure.store import open_store, repo
from procure.vendors.client import VendorClient
from procure.vendors.credentials import Keyring

TRAIN = Path(__file__).resolve().parent.parent / "examples" / "train.py"


async def main(db_url: str, runpod_url: str, run_id: str, checkpoints: str) -> int:
    keyring = Keyring(os.environ["PROCURE_SECRET_KEY"])
    client = RunPodCloud(
        RunPodSettings(RUNPOD_API_KEY=os.environ["RUNPOD_API_KEY"], RUNPOD_API_URL=runpod_url)
    )
    deps = AgentDeps(
        store=open_store(db_url),
        vendors=VendorClient(keyring),
        account=Account.create(),
        ledger=FacilitatorLedger("http://127.0.0.1:9"),
        clouds={"runpod": client},  # type: ignore[dict-item]
        cloud=CloudTuning(
            boot_timeout_s=30.0,
            reserve_ahead_s=10.0,
            command=(sys.executable, str(TRAIN), "--steps", "40", "--step-time", "0.05"),
            checkpoint_dir=checkpoints,
        ),
        keyring=keyring,
    )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            await tick(deps, run_id)
            with deps.store.session() as s:
                run = repo.get_run(s, run_id)
            if run is not None and run.status in TERMINAL_RUN_STATUSES:
                return 0
            await asyncio.sleep(0.02)
        return 3
    finally:
        await client.aclose()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:5])))
