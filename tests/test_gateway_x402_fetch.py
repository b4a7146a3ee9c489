"""Interop: the official x402 TypeScript client (`@x402/fetch`, scripts/x402-interop) buys a job
from procure's gateway, which runs it to its end on an instance it then terminates; a replay of the
same payment is charged nothing. Skips without node and `npm ci`, but never under CI=true."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from procure.gateway import book
from procure.models import usd_to_micros
from test_gateway import SECRET, GatewayWorld, start_gateway_world, wait_for

INTEROP = Path(__file__).resolve().parents[1] / "scripts" / "x402-interop"


def _require_x402_fetch() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (INTEROP / "node_modules" / "@x402" / "fetch").is_dir():
        missing = f"@x402/fetch is not installed: run `npm ci` in {INTEROP}"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"x402 fetch interop test cannot skip under CI=true: {missing}")
        pytest.skip(missing)
    assert node
    return node


@pytest.fixture
def gw(tmp_path: Path, sqlite_url: str) -> Iterator[GatewayWorld]:
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g
    g.stop()


def x402_fetch_buys(node: str, gw: GatewayWorld, private_key: str, key: str) -> Any:
    env = {
        **os.environ,
        "GATEWAY_URL": gw.url,
        "SECRET": SECRET,
        "PRIVATE_KEY": private_key,
        "KEY": key,
        "NETWORK": gw.cfg.network,
        "ASSET": gw.cfg.asset,
        "MAX_AMOUNT": str(usd_to_micros(1)),
    }
    done = subprocess.run(
        [node, str(INTEROP / "fetch_client.mjs")],
        cwd=INTEROP,
        env=env,
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def test_the_official_x402_client_buys_a_job_that_runs_and_is_charged_once(
    gw: GatewayWorld,
) -> None:
    node = _require_x402_fetch()
    account = Account.create()
    gw.world.chain.mint(account.address, usd_to_micros(20))
    key = account.key.hex()
    result = x402_fetch_buys(node, gw, key if key.startswith("0x") else "0x" + key, "ts-key")
    assert result["address"].lower() == account.address.lower()
    price = usd_to_micros(result["quote"]["amount"])

    paid = result["paid"]
    assert paid["status"] == 200, paid
    assert paid["paymentResponse"] and result["sentPayment"]
    job_id = paid["body"]["jobId"]
    done = result["jobStatus"]
    assert done["jobId"] == job_id
    assert done["status"] == "completed" and done["progress"] == 1.0, done
    assert any(line.startswith("step 20 loss") for line in done["logs"])
    wait_for(lambda: gw.live_pods() == [])  # the instance is terminated
    assert len(gw.pods()) == 1

    # The replay under the same key is the same job, answered from the key; under another key it
    # is refused. Neither moves money or starts a second job.
    same = result["replaySameKey"]
    assert same["status"] == 200 and json.loads(same["body"])["jobId"] == job_id
    assert same["idempotentReplay"] == "true"
    assert result["replayOtherKey"]["status"] in (402, 409), result["replayOtherKey"]
    transfers = [t for t in gw.world.chain.transfers() if t["to"] == gw.cfg.pay_to]
    assert [t["value"] for t in transfers] == [price]
    assert gw.world.chain.balance_of(account.address) == usd_to_micros(20) - price
    figures = book.figures(gw.store)
    assert figures["paymentsReceived"] == 1
    assert sum(figures["jobs"].values()) == 1
    assert usd_to_micros(figures["incomeUsd"]) == price
