"""The gateway's renewal prices and caps: a renewal is never sold below what the
job's instance costs plus the margin; a restarted gateway still quotes a renewal while its jobs
hold every free GPU; a renewal booked after its job expired relaunches it only under the caps;
a launch given up without an answer counts against the caps until the sweeper is done with it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.gateway.serve as gateway_serve
from procure.clouds.base import ProviderError
from procure.clouds.runpod.client import RunPodCloud
from procure.clouds.runpod.pacing import Pacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.gateway import book, launches, sales
from procure.gateway import loop as gateway_loop
from procure.gateway.serve import start_gateway
from procure.models import usd_to_micros
from test_gateway import (
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
from test_gateway_lost_launches_keys_and_quotes import _Ledger, _LostAnswerLaggingList
from test_gateway_renewal_in_doubt import renew_in_doubt, run_out_of_paid_time, running_job
from test_gateway_spend_and_instance_caps import gateway_db
from test_unknown_settlement import FlakySettle, flaky_client, pending

__all__ = ["gateway_db"]  # each test on SQLite and PostgreSQL, the gateway's book there too

# A job that runs far longer than any test here (each cancels it): its instance stays live.
LONG = (sys.executable, TRAIN, "--steps", "4000", "--step-time", "0.05", "--checkpoint-every", "5")


@pytest.fixture
def started() -> Iterator[list[GatewayWorld]]:
    worlds: list[GatewayWorld] = []
    yield worlds
    for g in worlds:
        g.stop()


def _cancel(g: GatewayWorld, *job_ids: str) -> None:
    for job_id in job_ids:
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers(), timeout=15)
    wait_for(lambda: g.live_pods() == [], 60)


def _renew(
    g: GatewayWorld, job_id: str, quote_id: str, key: str, account: Any | None = None
) -> httpx.Response:
    """A renewal of `job_id` on `quote_id`: its 402 paid from `account` when given (and the
    402 came), else the first, unpaid answer."""
    body = {"jobId": job_id, "quoteId": quote_id}
    headers = g.headers(key, quote_id)
    asked = httpx.post(f"{g.url}/renew-job", json=body, headers=headers, timeout=30)
    if account is None or asked.status_code != 402:
        return asked
    headers["PAYMENT-SIGNATURE"] = signed_payment(
        g, asked.headers["PAYMENT-REQUIRED"], account, nonce()
    )
    return httpx.post(f"{g.url}/renew-job", json=body, headers=headers, timeout=30)


def _quote_for_job(g: GatewayWorld, job_id: str) -> httpx.Response:
    return httpx.post(
        f"{g.url}/quote",
        json={"gpuType": "RTX4090", "hours": 1.0, "jobId": job_id},
        headers=g.headers(),
        timeout=15,
    )


# --- 1. renewals priced on the job's instance ---------------------------------------------------


class _Repriced:
    """The mock RunPod, every offer's price times `factor` (the cloud's prices move)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.factor = inner, 1.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        found = await self.inner.offers(**kwargs)
        return [replace(o, price_per_hour=round(o.price_per_hour * self.factor)) for o in found]


def test_a_renewal_is_never_sold_below_the_cost_of_the_jobs_instance(
    tmp_path: Path, gateway_db: str, started: list[GatewayWorld], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a renewal was sold at whatever valid quote of the GPU the buyer named: a
    quote taken while the RTX 4090 cost $0.34/h ($0.374/h sold) renewed a job whose instance was
    launched after the price doubled ($0.68/h): every renewed hour cost the gateway $0.306 more
    than it was paid. (Priced on the cheapest offer, a fresh quote did the same once the price
    fell back.)"""
    monkeypatch.setattr(sales, "OFFERS_TTL_S", 0.0)  # each quote sees the price of its moment
    g = start_gateway_world(tmp_path, gateway_db, command=LONG)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _Repriced(rt.cloud)
    hoarded = quote(g)  # at $0.34/h + 10 %
    assert hoarded["pricePerHour"] == pytest.approx(0.374)
    cloud.factor = 2.0  # the cloud's price doubles
    job_id = buy(g, "dear")  # sold at $0.748/h, launched at $0.68/h
    wait_for(lambda: job_status(g, job_id)["status"] == "running", 60)
    account = buyer(g, "renewer")
    before = g.world.chain.balance_of(account.address)
    cheap = _renew(g, job_id, hoarded["quoteId"], "cheap-slice", account)
    assert cheap.status_code == 409, f"renewed at $0.374/h on a $0.68/h instance: {cheap.text}"
    assert "$0.748/h" in cheap.json()["error"] and "jobId" in cheap.json()["error"], cheap.text
    assert g.world.chain.balance_of(account.address) == before  # nothing moved
    cloud.factor = 1.0  # the price falls back: the cheapest quote is below the instance again
    again = _renew(g, job_id, quote(g)["quoteId"], "cheap-slice-2")
    assert again.status_code == 409 and "PAYMENT-REQUIRED" not in again.headers, again.text
    # What the refusal tells the buyer to do works: a quote for the job, at its instance's price.
    for_job = _quote_for_job(g, job_id)
    assert for_job.status_code == 200, for_job.text
    assert for_job.json()["pricePerHour"] == pytest.approx(0.748)
    renewed = _renew(g, job_id, for_job.json()["quoteId"], "fair-slice", account)
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["paidHours"] == pytest.approx(2.0)
    assert before - g.world.chain.balance_of(account.address) == usd_to_micros(0.748)
    _cancel(g, job_id)


# --- 2. quotes after a restart --------------------------------------------------------------------


def _capacity(g: GatewayWorld, gpu: str, counts: dict[str, int]) -> None:
    for dc, count in counts.items():
        httpx.post(
            f"{g.mock.url}/admin/capacity",
            json={"gpu": gpu, "dataCenterId": dc, "count": count},
            headers={"Authorization": f"Bearer {g.mock.api_key}"},
            timeout=15,
        ).raise_for_status()


def _restart(g: GatewayWorld) -> None:
    """The gateway process stopped and started again on its book (its memory lost)."""
    g.server.stop()
    cloud = RunPodCloud(
        RunPodSettings(_env_file=None, api_key=g.mock.api_key, api_url=g.mock.url),  # type: ignore[call-arg]
        pacer=Pacer(),
    )
    g.server = start_gateway(g.cfg, g.store, cloud, g.world.facilitator.url)


def test_a_restarted_gateway_quotes_a_renewal_while_its_job_holds_the_last_gpu(
    tmp_path: Path, gateway_db: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: with no RTX 4090 free (the gateway's own job holds the last one), a quote
    is priced on the last offer the process quoted, kept in memory: after a restart there is
    none, every quote answered 409 "no capacity available", and the job's buyer could not renew
    (its job ran out) although renewing needs no free GPU."""
    g = start_gateway_world(tmp_path, gateway_db, command=LONG)
    started.append(g)
    _capacity(g, "NVIDIA GeForce RTX 4090", {"US-TX-3": 1, "EU-RO-1": 0, "CA-MTL-1": 0})
    job_id = buy(g, "last-gpu")
    wait_for(lambda: job_status(g, job_id)["status"] == "running", 60)
    assert quote(g)["pricePerHour"] == pytest.approx(0.374)  # the running process remembers
    _restart(g)
    asked = httpx.post(
        f"{g.url}/quote", json={"gpuType": "RTX4090", "hours": 1.0}, headers=g.headers()
    )
    assert asked.status_code == 200, f"after a restart: {asked.text}"
    assert asked.json()["pricePerHour"] == pytest.approx(0.374)
    renewed = _renew(g, job_id, asked.json()["quoteId"], "after-restart", buyer(g, "renewer"))
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["paidHours"] == pytest.approx(2.0)
    _cancel(g, job_id)


# --- 3. a renewal booked after its job expired, at the caps ---------------------------------------


def _job_state(g: GatewayWorld, job_id: str) -> str:
    with g.store.session() as s:
        row = book.job(s, job_id)
        return row.status if row is not None else ""


def test_a_job_revived_by_a_late_renewal_waits_for_room_under_the_instance_cap(
    tmp_path: Path, gateway_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a renewal booked after its job had expired (its settle answer lost, the
    ledger down through the hold) relaunched the job at once: at a cap of one instance, with
    another buyer's job sold in the meantime, a second instance was launched and billed beside
    it, past the operator's cap."""
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    g = start_gateway_world(tmp_path, gateway_db, command=LONG, max_total_instances=1)
    try:
        facilitator = clients[0]
        rt = g.server.app.state.runtime
        account = buyer(g, "renewer")
        job_id, _ = running_job(g, account)
        wait_for(lambda: job_status(g, job_id).get("checkpointUrl"), 60)
        facilitator.mode = "held"  # the renewal's settle answer never comes
        rt.ledger = ledger = _Ledger(rt.ledger)  # ... and the ledger cannot say
        renew_in_doubt(g, job_id, account)
        monkeypatch.setattr(gateway_loop, "AUTH_WINDOW_S", 0.5)  # the hold is short here
        run_out_of_paid_time(g, job_id)
        wait_for(lambda: _job_state(g, job_id) == "expired" and g.live_pods() == [], 60)
        facilitator.mode = "ok"
        # Under the cap again: another buyer is sold the one instance the operator allows.
        other_q = quote(g)
        asked = submit(g, "other", other_q)
        assert asked.status_code == 402, asked.text
        payment = signed_payment(g, asked.headers["PAYMENT-REQUIRED"], buyer(g, "other"), nonce())
        paid = submit(g, "other", other_q, payment)
        assert paid.status_code == 200, paid.text
        other = paid.json()["jobId"]
        wait_for(lambda: job_status(g, other)["status"] == "running", 60)
        # The renewal had settled after all; the ledger answers again and it is booked.
        assert facilitator.release(g.world.facilitator.url) == 1
        ledger.down = False
        wait_for(lambda: pending(g) == [], 60)
        waiting = wait_for(
            lambda: (
                (
                    (s := job_status(g, job_id))["status"] != "expired"
                    and any("under the gateway's caps" in line for line in s["logs"])
                    and s
                )
                or len(g.live_pods()) > 1
            ),
            60,
        )
        assert len(g.live_pods()) == 1, f"{len(g.live_pods())} instances at a cap of one"
        assert waiting["status"] == "queued", waiting
        assert any("waiting for room under the gateway's caps" in s for s in waiting["logs"])
        # The other job ends: the revived one is launched, from its last checkpoint.
        httpx.post(f"{g.url}/cancel-job", json={"jobId": other}, headers=g.headers(), timeout=15)
        shown = wait_for(lambda: (s := job_status(g, job_id))["status"] == "running" and s, 60)
        assert any("resuming from" in line for line in shown["logs"]), shown["logs"]
        assert len(g.live_pods()) == 1
        _cancel(g, job_id)
    finally:
        g.stop()


# --- 4. a launch given up without an answer -------------------------------------------------------


class _LostAnswerNeverMade(_LostAnswerLaggingList):
    """The mock RunPod, its first createPod timing out before anything was made."""

    async def launch_spec(self, spec: Any) -> Any:
        self.launches.append(spec.name)
        if len(self.launches) == 1:
            raise ProviderError("createPod: read timed out")
        return await self.inner.launch_spec(spec)


@pytest.mark.parametrize("made", [True, False], ids=["shows-later", "never-made"])
def test_a_launch_given_up_without_an_answer_counts_against_the_cap_until_swept(
    tmp_path: Path,
    gateway_db: str,
    started: list[GatewayWorld],
    monkeypatch: pytest.MonkeyPatch,
    made: bool,
) -> None:
    """Before the fix: a launch whose answer was lost, not listed by its name for a while, was
    given up and marked failed: it stopped counting against the caps while the pod it made
    billed on (the listing lagging). At a cap of two instances, a second buyer was sold one
    beside the job's two pods: three billed. (One never made counts until the sweeper has
    not seen it for the boot timeout.)"""
    monkeypatch.setattr(launches, "LAUNCH_LOOKUP_S", 0.5)
    g = start_gateway_world(
        tmp_path, gateway_db, command=LONG, max_total_instances=2, boot_timeout_s=5.0
    )
    started.append(g)
    rt = g.server.app.state.runtime
    kind = _LostAnswerLaggingList if made else _LostAnswerNeverMade
    rt.cloud = cloud = kind(rt.cloud)
    job_id = buy(g, "lost-answer", hours=10.0)  # runs on through the test (an hour is 60 s)
    wait_for(lambda: job_status(g, job_id)["status"] == "running", 60)
    # One launch given up (billing on, or never made: the gateway cannot tell yet), one running.
    assert len(cloud.launches) == 2 and len(g.live_pods()) == (2 if made else 1)
    refused = submit(g, "third-pod", quote(g))
    assert refused.status_code == 503 and "cap is 2" in refused.text, (
        f"sold a third instance beside two that may bill at a cap of two: {refused.text}"
    )
    cloud.lagging = False  # the given-up pod shows at last: the sweeper terminates it
    wait_for(lambda: len(g.live_pods()) == 1, 60)

    def committed() -> int:
        answer = httpx.get(f"{g.url}/gateway/status", headers=g.headers(), timeout=15)
        return int(answer.json()["committedInstances"])

    wait_for(lambda: committed() == 1, 60)  # swept (or never came): it counts no more
    assert job_status(g, job_id)["status"] == "running"  # the job's own instance still counts
    other = buy(g, "third-pod-later")
    _cancel(g, job_id, other)
