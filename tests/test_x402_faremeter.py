"""Interop with a second x402 implementation, faremeter (npm, scripts/x402-interop), both ways and
in both protocol versions, settled on the local chain by procure's facilitator: procure's payer
pays a faremeter vendor in v1 and v2 mode, faremeter's client pays procure's mock vendor in v1
and v2 mode, and a replay is charged once.

Needs node and `npm ci` in scripts/x402-interop; skips without them, but never under CI=true.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from procure.local import free_port
from procure.models import Vendor, usd_to_micros
from procure.vendors.client import PaymentRefused
from procure.vendors.registry import vendor_payee
from test_x402_v1 import SECRET, Net, buy, funded, net, paid_to, shop  # noqa: F401

INTEROP = Path(__file__).resolve().parents[1] / "scripts" / "x402-interop"
MODULES = INTEROP / "node_modules" / "@faremeter"
PRICE = 1_400_000


def _require_faremeter() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (MODULES / "fetch").is_dir() or not (MODULES / "middleware").is_dir():
        missing = f"faremeter is not installed: run `npm ci` in {INTEROP}"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"faremeter interop tests cannot skip under CI=true: {missing}")
        pytest.skip(missing)
    assert node
    return node


@pytest.fixture(scope="module")
def node() -> str:
    return _require_faremeter()


def wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"faremeter vendor exited: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("faremeter vendor did not start")


@pytest.fixture
def faremeter_vendor(node: str, net: Net, request: pytest.FixtureRequest) -> Iterator[Any]:  # noqa: F811
    """A factory of faremeter vendors (node processes) speaking the given x402 versions."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(versions: str, *, lowercase: bool = False) -> Vendor:
        vendor_id = f"faremeter-{len(procs)}-{request.node.name}"[:80]
        payee = vendor_payee(vendor_id)
        asset = net.chain.token_address
        port = free_port()
        env = {
            **os.environ,
            "PORT": str(port),
            "FACILITATOR_URL": net.facilitator.url,
            "NETWORK": net.chain.network,
            "ASSET": asset.lower() if lowercase else asset,
            "ASSET_NAME": net.chain.token_name,
            "ASSET_VERSION": net.chain.token_version,
            "PAY_TO": payee.lower() if lowercase else payee,
            "PRICE": str(PRICE),
            "VENDOR_ID": vendor_id,
            "X402_VERSIONS": versions,
        }
        proc = subprocess.Popen(
            [node, str(INTEROP / "vendor.mjs")],
            cwd=INTEROP,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        return Vendor(
            vendor_id=vendor_id,
            name="faremeter vendor",
            endpoint=url,
            base_price_per_hour=PRICE,
            reliability_score=0.9,
            supported_gpu_types=["A100"],
            pay_to=payee,
            network=net.chain.network,
            asset=asset,
        )

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


class _Shop:
    def __init__(self, vendor: Vendor) -> None:
        self.vendor = vendor


@pytest.mark.parametrize("versions", ["1", "2"], ids=["v1", "v2"])
@pytest.mark.parametrize("lowercase", [False, True], ids=["checksummed", "lowercase"])
def test_procure_pays_a_faremeter_vendor(
    net: Net,  # noqa: F811
    faremeter_vendor: Any,
    versions: str,
    lowercase: bool,
) -> None:
    vendor = faremeter_vendor(versions, lowercase=lowercase)
    account = funded(net)
    done = asyncio.run(buy(net, _Shop(vendor), account, "fm-pay", "fm-job"))  # type: ignore[arg-type]
    assert done.tx_hash and done.settled_amount == PRICE
    assert done.job.logs == [f"paid over x402 v{versions}"]
    # A replay of the same payment (same nonce) is refused by the chain: charged once.
    with pytest.raises(PaymentRefused):
        asyncio.run(buy(net, _Shop(vendor), account, "fm-pay", "fm-job"))  # type: ignore[arg-type]
    assert paid_to(net, vendor.pay_to or "") == [PRICE]
    assert net.chain.balance_of(account.address) == usd_to_micros(20) - PRICE
    assert [s["version"] for s in httpx.get(f"{vendor.endpoint}/settled").json()] == [int(versions)]


def faremeter_pays(node: str, net: Net, account: LocalAccount, url: str, **req: Any) -> Any:  # noqa: F811
    args = {
        "url": url,
        "privateKey": account.key.hex()
        if account.key.hex().startswith("0x")
        else "0x" + account.key.hex(),
        "chainId": net.chain.chain_id,
        "asset": net.chain.token_address,
        "assetName": net.chain.token_name,
        **req,
    }
    done = subprocess.run(
        [node, str(INTEROP / "client.mjs"), json.dumps(args)],
        cwd=INTEROP,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("versions", [(1,), (2,)], ids=["v1", "v2"])
def test_faremeter_pays_procures_vendor(
    node: str,
    net: Net,  # noqa: F811
    shop: Any,  # noqa: F811
    versions: tuple[int, ...],
) -> None:
    s = shop(versions)
    account = funded(net)
    auth = {"Authorization": f"Bearer {SECRET}"}
    quote = httpx.post(
        f"{s.server.url}/quote", json={"gpuType": "A100", "hours": 1}, headers=auth
    ).json()
    headers = {**auth, "Idempotency-Key": "fm-key", "X-Quote-Id": quote["quoteId"]}
    body = {"quoteId": quote["quoteId"], "jobParams": {}}
    first = faremeter_pays(
        node, net, account, f"{s.server.url}/submit-job", headers=headers, body=body
    )
    assert first["status"] == 200, first
    assert first["paymentResponse"]
    job = json.loads(first["body"])
    assert job["status"] == "running" and job["paidHours"] == 1.0
    # The same submission again: answered from the key, unpaid.
    again = faremeter_pays(
        node, net, account, f"{s.server.url}/submit-job", headers=headers, body=body
    )
    assert again["status"] == 200 and json.loads(again["body"])["jobId"] == job["jobId"]
    assert paid_to(net, s.vendor.pay_to or "") == [usd_to_micros(1.4)]
    stats = httpx.get(f"{s.server.url}/admin/stats", headers=auth).json()
    assert (stats["started"], stats["replays"]) == (1, 1)
