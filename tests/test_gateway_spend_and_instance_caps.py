"""The gateway's caps over all buyers on the operator's cloud account (`max_hourly_usd`,
`max_total_instances`): a sale that would pass either is refused before any money moves, however
many buyers (or addresses) ask and however they pay together; instances launching or still being
ended count; renewals add no instance and stay allowed; a gateway configured without caps has
finite ones; `procure gateway` takes them as options and its status shows them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import test_gateway
from procure.clouds.base import CloudError
from procure.clouds.runpod.mock import start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.gateway import book
from procure.gateway.settings import GatewayConfig
from procure.local import free_port
from procure.models import usd_to_micros
from procure.store import open_store
from test_gateway import (
    SECRET,
    TRAIN,
    GatewayWorld,
    buy,
    buyer,
    job_status,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)
from test_gateway_sales_one_payment_one_gpu import _SlowLaunch
from world import start_world

# A job that runs far longer than any test here (the tests cancel it): its instance stays live.
LONG = (sys.executable, TRAIN, "--steps", "4000", "--step-time", "0.05", "--checkpoint-every", "50")
A100_SALE = 1.309  # RunPod's community A100 ($1.19/h) plus the 10 % margin
RTX4090_SALE = 0.374  # RunPod's community RTX 4090 ($0.34/h) plus the 10 % margin


@pytest.fixture
def gateway_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`db_url`; on PostgreSQL the gateway's own book goes there too (`start_gateway_world`
    keeps it in a SQLite file of its own otherwise), so its caps are counted on that store."""
    if db_url.startswith("postgresql"):
        monkeypatch.setattr(test_gateway, "open_store", lambda _url: open_store(db_url))
    return db_url


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[GatewayWorld]]:
    """Gateway worlds a test starts (each after setting its caps), all stopped at its end."""
    worlds: list[GatewayWorld] = []
    yield worlds
    for g in worlds:
        g.stop()


def _paid(g: GatewayWorld, key: str, q: dict[str, Any], account: Any) -> httpx.Response:
    """Submit `q` under `key`, paying its 402 from `account` (the 402 must come)."""
    asked = submit(g, key, q)
    assert asked.status_code == 402, asked.text
    return submit(g, key, q, signed_payment(g, asked.headers["PAYMENT-REQUIRED"], account, nonce()))


def _status(g: GatewayWorld) -> dict[str, Any]:
    answer = httpx.get(f"{g.url}/gateway/status", headers=g.headers(), timeout=15)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _cancel_all(g: GatewayWorld) -> None:
    with g.store.session() as s:
        ids = book.started_job_ids(s)
    for job_id in ids:
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
    wait_for(lambda: g.live_pods() == [], 60)


def test_a_sale_past_the_hourly_spend_cap_is_refused_before_any_money_moves(
    tmp_path: Path, gateway_db: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: nothing bounded what the gateway's instances cost per hour together; a
    gateway whose operator allows $2/h sold a second A100 ($1.309/h each) to a second buyer,
    took the money and launched it ($2.62/h on the operator's account)."""
    g = start_gateway_world(tmp_path, gateway_db, max_hourly_usd=2.0, command=LONG)
    started.append(g)
    first, second = buyer(g, "first"), buyer(g, "second")
    q1, q2 = quote(g, gpu="A100"), quote(g, gpu="A100")
    # The second buyer is asked to pay while nothing is sold yet, and pays once the first has.
    asked = submit(g, "a100-second", q2)
    assert asked.status_code == 402, asked.text
    assert _paid(g, "a100-first", q1, first).status_code == 200
    before = g.world.chain.balance_of(second.address)
    late = submit(
        g, "a100-second", q2, signed_payment(g, asked.headers["PAYMENT-REQUIRED"], second, nonce())
    )
    assert late.status_code == 503 and "spend cap" in late.json()["error"], late.text
    assert g.world.chain.balance_of(second.address) == before  # nothing moved
    # Another A100 is refused before its 402: nothing to sign in vain.
    again = submit(g, "a100-third", quote(g, gpu="A100"))
    assert again.status_code == 503 and "PAYMENT-REQUIRED" not in again.headers, again.text
    assert "$2.00/h" in again.json()["error"]
    # What still fits under the cap is sold: the cap counts dollars, not jobs.
    assert _paid(g, "rtx-fits", quote(g), second).status_code == 200
    assert g.income() == usd_to_micros(A100_SALE) + usd_to_micros(RTX4090_SALE)
    # Each sold job counts at the most any launch of it may cost: its sale price.
    committed = A100_SALE + RTX4090_SALE
    status = _status(g)
    assert status["maxHourlyUsd"] == 2.0 and status["committedInstances"] == 2, status
    assert status["committedUsdPerHour"] == pytest.approx(committed), status
    scraped = httpx.get(f"{g.url}/metrics", headers=g.headers(), timeout=15).text
    assert f'procure_gateway_committed_usd_per_hour{{vendor_id="gw1"}} {committed:g}' in scraped
    _cancel_all(g)


def test_at_the_instance_cap_a_new_buyer_is_refused_but_a_running_job_is_still_renewed(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: the only bounds were per buyer (`max_instances`) and 1,000 live jobs:
    with the operator's cap at two instances, a third buyer (or the first under a new address)
    was sold a third instance."""
    g = start_gateway_world(tmp_path, sqlite_url, max_total_instances=2, command=LONG)
    started.append(g)
    one, two = buy(g, "one"), buy(g, "two")
    wait_for(lambda: job_status(g, one)["status"] == "running", 60)
    third = submit(g, "three", quote(g))
    assert third.status_code == 503 and "PAYMENT-REQUIRED" not in third.headers, third.text
    assert "cap is 2" in third.json()["error"]
    # The running job's buyer renews at the cap: it adds no instance.
    q = quote(g)
    body = {"jobId": one, "quoteId": q["quoteId"]}
    headers = g.headers("one-more-hour", q["quoteId"])
    asked = httpx.post(f"{g.url}/renew-job", json=body, headers=headers, timeout=30)
    assert asked.status_code == 402, asked.text
    headers["PAYMENT-SIGNATURE"] = signed_payment(
        g, asked.headers["PAYMENT-REQUIRED"], buyer(g, "renewer"), nonce()
    )
    renewed = httpx.post(f"{g.url}/renew-job", json=body, headers=headers, timeout=30)
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["paidHours"] == pytest.approx(2.0)
    # An instance that ends frees its place for the next buyer.
    httpx.post(f"{g.url}/cancel-job", json={"jobId": two}, headers=g.headers(), timeout=15)
    wait_for(lambda: _status(g)["committedInstances"] == 1, 60)
    assert _paid(g, "three", quote(g), buyer(g, "three")).status_code == 200
    _cancel_all(g)


class _StuckTerminate:
    """The mock RunPod, its terminations refused (a provider outage) while `stuck`."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.stuck, self.refused = inner, False, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def terminate(self, ids: list[str]) -> None:
        if self.stuck:
            self.refused += 1
            raise CloudError("terminate: the provider is not answering")
        await self.inner.terminate(ids)


def _job_state(g: GatewayWorld, job_id: str) -> str:
    with g.store.session() as s:
        row = book.job(s, job_id)
        return row.status if row is not None else ""


def test_an_instance_still_being_ended_counts_against_the_cap_until_it_is_gone(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: a job being ended whose instance the cloud would not yet terminate (still
    running, still billed) counted for nothing: at a cap of one instance a second was sold and
    launched beside it."""
    g = start_gateway_world(tmp_path, sqlite_url, max_total_instances=1, command=LONG)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _StuckTerminate(rt.cloud)
    job_id = buy(g, "ending")
    wait_for(lambda: job_status(g, job_id)["status"] == "running", 60)
    cloud.stuck = True
    httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
    wait_for(lambda: cloud.refused >= 1 and _job_state(g, job_id) == "ending", 60)
    assert len(g.live_pods()) == 1  # still billing
    refused = submit(g, "next", quote(g))
    assert refused.status_code == 503 and "cap is 1" in refused.text, refused.text
    cloud.stuck = False
    wait_for(lambda: g.live_pods() == [] and _job_state(g, job_id) == "cancelled", 60)
    assert _paid(g, "next", quote(g), buyer(g, "next")).status_code == 200
    _cancel_all(g)


def test_buyers_paying_together_cannot_pass_the_cap_together(
    tmp_path: Path, gateway_db: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: with no cap over all buyers, six buyers paying at once were all sold an
    instance where the operator allowed two. (Each is asked to pay while nothing is sold, so
    only the paid request, checked where its job is written, can hold the cap.)"""
    g = start_gateway_world(tmp_path, gateway_db, max_total_instances=2, command=LONG)
    started.append(g)
    buyers = [buyer(g, f"crowd-{i}") for i in range(6)]
    q = quote(g)
    payments = []
    for i, account in enumerate(buyers):
        asked = submit(g, f"crowd-{i}", q)
        assert asked.status_code == 402, asked.text
        payments.append(signed_payment(g, asked.headers["PAYMENT-REQUIRED"], account, nonce()))
    with ThreadPoolExecutor(len(buyers)) as pool:
        answers = list(
            pool.map(lambda i: submit(g, f"crowd-{i}", q, payments[i]), range(len(buyers)))
        )
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 503, 503, 503, 503], [a.text for a in answers]
    assert g.income() == 2 * usd_to_micros(q["amount"])
    for account, answer in zip(buyers, answers, strict=True):
        if answer.status_code == 503:  # a refused buyer kept every cent
            assert g.world.chain.balance_of(account.address) == usd_to_micros(20.0)
    assert sum(book.figures(g.store)["jobs"].values()) == 2
    _cancel_all(g)


def test_a_gateway_configured_without_caps_stops_at_its_default_caps(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: a gateway started without any cap (a config file that names none, or
    `procure gateway` with no flags) sold instances to buyers until 1,000 jobs were live; it
    now stops at its documented default of eight, and a cap given as null or below zero is an
    error, never "unbounded"."""
    g = start_gateway_world(tmp_path, sqlite_url, command=LONG)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = _SlowLaunch(rt.cloud)  # launches wait: every sale stays sold, none ends
    for i in range(8):
        buy(g, f"default-{i}")
    ninth = submit(g, "default-8", quote(g))
    assert ninth.status_code == 503 and "cap is 8" in ninth.text, ninth.text
    status = _status(g)
    assert (status["maxTotalInstances"], status["maxHourlyUsd"]) == (8, 50.0), status
    cfg = {k: v for k, v in vars(g.cfg).items() if not k.startswith("max_")}
    for bad in ({"max_hourly_usd": None}, {"max_hourly_usd": -1.0}, {"max_total_instances": -1}):
        with pytest.raises(ValueError, match="max_"):
            GatewayConfig(**cfg, **bad)


def test_procure_gateway_takes_its_caps_as_options_and_shows_them_in_its_status(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: `procure gateway` had no option to bound the operator's spend over all
    buyers (`--max-hourly-usd`, `--max-total-instances` were refused as unknown) and its status
    said nothing of it."""
    world = start_world(tmp_path, sqlite_url)
    mock = start_mock_cloud(RunPodMockConfig(provision_s=0.3, start_s=0.3))
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PROCURE_", "RUNPOD_"))},
        "COLUMNS": "200",
        "PROCURE_HOME": str(tmp_path / "gateway-home"),
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'cli-gateway.db'}",
        "RUNPOD_API_KEY": mock.api_key,
        "RUNPOD_API_URL": mock.url,
        "X402_FACILITATOR_URL": world.facilitator.url,
        "GPU_VENDOR_SECRET": SECRET,
    }
    command = [sys.executable, "-m", "procure.cli", "gateway"]
    helped = subprocess.run(
        [*command, "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert "--max-hourly-usd" in helped.stdout and "--max-total-instances" in helped.stdout
    assert "--launch-retry-seconds" in helped.stdout
    caps = [
        *("--max-hourly-usd", "12.5", "--max-total-instances", "3"),
        *("--launch-retry-seconds", "90"),
    ]
    gateway = subprocess.Popen(
        [*command, "--cloud", "runpod", "--port", str(port), *caps],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def status() -> dict[str, Any] | None:
            if gateway.poll() is not None:
                raise AssertionError(f"procure gateway exited: {gateway.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                answer = httpx.get(
                    f"{url}/gateway/status",
                    headers={"Authorization": f"Bearer {SECRET}"},
                    timeout=5,
                )
            except httpx.TransportError:
                time.sleep(0.1)  # not listening yet
                return None
            return dict(answer.json()) if answer.status_code == 200 else None

        shown = wait_for(status, 60)
        assert shown["maxHourlyUsd"] == 12.5 and shown["maxTotalInstances"] == 3, shown
        assert shown["launchRetryS"] == 90, shown
        assert shown["committedInstances"] == 0 and shown["committedUsdPerHour"] == 0, shown
    finally:
        gateway.terminate()
        gateway.wait(30)
        mock.stop()
        world.stop()
    # No scrape token set: the operator is told that /metrics opens to every buyer's bearer.
    assert "PROCURE_METRICS_TOKEN is not set" in gateway.stderr.read()  # type: ignore[union-attr]
