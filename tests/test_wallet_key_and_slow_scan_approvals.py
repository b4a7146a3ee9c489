"""Second looks at two fixes: a wallet key read from a secret file (a trailing newline) is taken
stripped, and an approval after its deadline is refused even when the controller's last scan was
slow (its clock offset is measured at the scan's start)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from fleet_fakes import PRICE, FakeCloud
from fleet_world import settings as fleet_settings
from procure.api.app import create_app
from procure.clouds.base import Instance
from procure.fleet.context import FleetContext
from procure.fleet.controller import scan_once
from procure.httpbounds import bounded_client
from procure.local import free_port, serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import fleet_repo, open_store

# --- helpers -------------------------------------------------------------------------------------

# Settings a developer's shell may hold: none may leak into the CLI runs below
_OURS = ("PROCURE_", "LAMBDA_", "RUNPOD_", "VAST_", "X402_", "GPU_", "FLEET_", "LLM_", "PLANNER_")


def _procure(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, from a directory of their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
    env |= {
        "COLUMNS": "200",
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}",
        "PROCURE_HOME": str(tmp_path / "home"),
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "procure.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.contextmanager
def _silent_node(ip: str, port: int) -> Iterator[None]:
    """A GPU node that accepts connections and never answers (a hung instance)."""
    listener = socket.create_server((ip, port))
    try:
        yield
    finally:
        listener.close()


# --- settings: X402_PRIVATE_KEY ------------------------------------------------------------------


def test_a_wallet_key_with_a_trailing_newline_is_taken_stripped(
    tmp_path: Path,
) -> None:
    """Before the fix: the new X402_PRIVATE_KEY check strips the value before matching it, but the
    value used is not stripped: a key read from a secret file (trailing newline, as Kubernetes or
    `$(cat key)` in some shells hand it over) is accepted and `procure wallet` (the worker, `run
    tick`) dies in a binascii traceback deep in eth-account, which the check was added to
    prevent."""
    key = "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
    # A facilitator nobody runs (the default port may hold one a user started).
    nobody = f"http://127.0.0.1:{free_port()}"
    result = _procure(
        tmp_path, "wallet", "--json", X402_PRIVATE_KEY=key + "\n", X402_FACILITATOR_URL=nobody
    )
    full = result.stdout + result.stderr
    assert "Traceback" not in full, full[-1500:]
    assert key[2:] not in full  # never echoed
    # The key used as the check read it (then the facilitator, not running here, is what the
    # one line names) or refused by name in one line: either way one line, no traceback.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), full[-1500:]
    assert "X402_PRIVATE_KEY" in lines[0] or "facilitator" in lines[0], lines[0]


# --- fleet: an approval judged on the controller's clock ------------------------------------------


def test_an_approval_after_its_deadline_is_refused_even_after_a_slow_scan(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Before the fix: `note_scan(wall=utcnow())` records the scan's *start* (`now`) less the wall
    clock at its *end*: a real controller's clock looks behind by the scan's duration (a hung node,
    a slow launch). `decide` then judges expiry that much late: an approval given after the window
    closed is accepted, and the controller's next scan launches a paid instance on it (the Fleet
    page shows time left on an expired action too)."""
    token = "review-token"

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=50)
        hung_ip = "127.0.0.77"  # a second instance whose node never answers: a 4 s scan
        cloud.instances_["i-hung"] = Instance(
            "i-hung", None, "active", "gpu_1x_a100", "us-east-1", hung_ip, PRICE
        )
        store = open_store(sqlite_url)
        nodes = bounded_client(deadline_s=4)
        ctx = FleetContext(
            store=store,
            cloud=cloud,
            nodes=nodes,
            cfg=fleet_settings(cloud, confirmation_threshold=1.0),
            clock=utcnow,  # a real controller: its clock is the wall clock
            dry_run=False,
        )
        app_settings = Settings(
            PROCURE_DATABASE_URL=sqlite_url,
            PROCURE_HOME=tmp_path / "home",
            PROCURE_API_TOKEN=token,
            X402_FACILITATOR_URL="http://127.0.0.1:9",
        )
        server = serve(create_app(app_settings, open_store(sqlite_url)))
        try:
            start = utcnow()
            with store.session() as s:  # proposed by an earlier scan; its window closes soon
                action_id = "provision_review_1"
                fleet_repo.add_action(
                    s,
                    action_id=action_id,
                    action_type="provision_instance",
                    target_instance=None,
                    reason="sustained high utilisation",
                    cost_impact=Decimal("1.29"),
                    status="pending",
                    metrics_before={},
                    created_at=start - timedelta(minutes=5),
                    dry_run=False,
                    instance_type="gpu_1x_a100",
                    region="us-east-1",
                    price_per_hour=PRICE,
                    needed_approval=True,
                    expires_at=start + timedelta(seconds=2.5),
                )
            with _silent_node(hung_ip, cloud.node_port):
                await scan_once(ctx)  # expiry checked early; then 4 s on the hung node
            assert utcnow() > start + timedelta(seconds=2.5)  # the window has closed
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                answer = await http.post(
                    f"/api/fleet/actions/{action_id}/approve",
                    headers={"Authorization": f"Bearer {token}"},
                )
            del cloud.instances_["i-hung"]
            await scan_once(ctx)  # the controller's next scan
            assert cloud.launches == [], (
                f"launched on an approval given after its window closed ({answer.status_code})"
            )
            assert answer.status_code == 409 and "expired" in answer.text
        finally:
            server.stop()
            await nodes.aclose()
            cloud.close()
            store.dispose()

    asyncio.run(body())


@pytest.fixture(autouse=True)
def _no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read `.env` from the working directory: a test's own, empty one."""
    monkeypatch.chdir(tmp_path)
