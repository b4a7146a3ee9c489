"""The gateway's sales: one payment never buys two jobs, whatever its nonce's spelling; a buyer's
quotes cannot drive the gateway into its cloud's rate limits; a replacement launch is never
dearer than the sale; the last GPU is not sold twice while its first launch is on its way; a
renewal is priced on its own job's GPU however the body spells its fields."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.http.utils import decode_payment_signature_header, encode_payment_signature_header

import procure.gateway.serve as gateway_serve
from procure.gateway import book
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
from test_unknown_settlement import FlakySettle, flaky_client, paid_out, pending


@pytest.fixture
def held_gw(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GatewayWorld, FlakySettle]]:
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g, clients[0]
    g.stop()


def respelled(payment: str, spell: Any) -> str:
    """The same signed payment, its nonce written another way (the same 32 bytes)."""
    payload = decode_payment_signature_header(payment)
    auth = payload.payload["authorization"]
    auth["nonce"] = spell(auth["nonce"])
    return encode_payment_signature_header(payload)


@pytest.mark.parametrize(
    "spell",
    [lambda n: "0x" + n[2:].upper(), lambda n: n[2:]],
    ids=["upper-case", "no-0x"],
)
def test_one_payment_whatever_its_nonce_spelling_buys_one_job(
    held_gw: tuple[GatewayWorld, FlakySettle], spell: Any
) -> None:
    """Before the fix: the gateway took a payment's nonce as the string signed, so the same
    signed authorisation with its nonce in upper case (or without 0x: the same bytes, still
    verified) passed the "nonce never seen" check under another key while the first was being
    settled; once the first settled, the ledger showed that nonce used, to the gateway, for the
    amount, and both jobs were booked paid: two jobs for one transfer."""
    gw, facilitator = held_gw
    account = buyer(gw, "twice")
    q = quote(gw)
    first = submit(gw, "once-1", q)
    assert first.status_code == 402, first.text
    payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], account, nonce())
    facilitator.mode = "held"  # the settle is slow: its answer comes after the next request
    doubt = submit(gw, "once-1", q, payment)
    assert doubt.status_code == 503, doubt.text
    again = submit(gw, "once-2", q, respelled(payment, spell))
    # The first settlement reaches the chain; the loop books it from the ledger.
    facilitator.held = facilitator.held[:1]  # a second could never settle: its nonce is used
    assert facilitator.release(gw.world.facilitator.url) == 1
    wait_for(lambda: pending(gw) == [])
    [moved] = paid_out(gw)
    figures = book.figures(gw.store)
    assert figures["paymentsReceived"] == 1, figures
    assert sum(figures["jobs"].values()) == 1, figures
    assert usd_to_micros(figures["incomeUsd"]) == moved["value"] == usd_to_micros(q["amount"])
    assert again.status_code == 409, again.text  # refused before it could be settled
    replay = submit(gw, "once-2", q)
    assert replay.status_code == 402, replay.text  # nothing was sold under the second key


class _Counted:
    """The mock RunPod, its catalogue reads counted (each is two calls to RunPod's API)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        self.reads += 1
        return list(await self.inner.offers(**kwargs))


def test_quotes_for_made_up_gpus_do_not_each_call_the_cloud(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: the gateway's offer cache (which keeps a buyer asking for quotes in a loop
    from driving it into the cloud's rate limits) was keyed by the GPU name the buyer sent; a
    gateway selling whatever the cloud offers (no --gpu) read the cloud's whole catalogue again
    for every new made-up name, and kept an entry for each name for ever."""
    g = start_gateway_world(tmp_path, sqlite_url, gpus=())
    try:
        rt = g.server.app.state.runtime
        rt.cloud = counted = _Counted(rt.cloud)
        for i in range(40):
            answer = httpx.post(
                f"{g.url}/quote", json={"gpuType": f"NOPE{i}", "hours": 1}, headers=g.headers()
            )
            assert answer.status_code == 409, answer.text  # none of that GPU, nothing sold
        real = quote(g)
        assert real["pricePerHour"] == pytest.approx(0.374)  # a real GPU is still quoted
        # One read serves every name for the cache's few seconds (a slow machine: a few more).
        assert counted.reads <= 8, f"{counted.reads} catalogue reads for 41 quotes"
    finally:
        g.stop()


class _CommunitySoldOut:
    """The mock RunPod, its cheap community tier withdrawable (sold out) on demand."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.community = inner, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        found = await self.inner.offers(**kwargs)
        return [o for o in found if self.community or not o.offer_id.startswith("COMMUNITY")]


def _error_of(g: GatewayWorld, job_id: str) -> str:
    with g.store.session() as s:
        row = book.job(s, job_id)
        return (row.error or "") if row is not None else ""


def test_a_lost_instance_is_never_replaced_by_one_dearer_than_the_sale(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: only the submit compared the cloud's price with the quote; the loop
    launched (and relaunched, after a lost instance or a capacity refusal) on the cheapest offer
    left, whatever its price: a job sold at $0.374/h (community $0.34 + 10 %) whose pod was lost
    once the community tier had sold out ran on a $0.69/h secure pod, every hour at a loss."""
    job = (
        sys.executable,
        TRAIN,
        "--steps",
        "600",
        "--step-time",
        "0.05",
        "--checkpoint-every",
        "5",
    )
    g = start_gateway_world(tmp_path, sqlite_url, command=job)
    try:
        rt = g.server.app.state.runtime
        rt.cloud = cloud = _CommunitySoldOut(rt.cloud)
        job_id = buy(g, "lost-once")
        wait_for(lambda: job_status(g, job_id)["status"] == "running")
        sold = usd_to_micros(job_status(g, job_id)["amount"]) / job_status(g, job_id)["paidHours"]
        cloud.community = False  # sold out meanwhile: only the secure tier ($0.69/h) is left
        [pod] = g.live_pods()
        lost = httpx.post(
            f"{g.mock.url}/admin/instances/{pod['id']}/preempt",
            headers={"Authorization": f"Bearer {g.mock.api_key}"},
        )
        assert lost.status_code == 200, lost.text
        # The loop has looked for a replacement: launched one, or said why it did not.
        wait_for(lambda: len(g.pods()) > 1 or "dearer" in _error_of(g, job_id), 60)
        costs = [usd_to_micros(p["cost"]) for p in g.pods()]
        assert all(c <= sold for c in costs), f"pods at {costs} micro-USD/h, sold at {sold:.0f}"
        # A cheap offer again: the job is relaunched on it and resumes.
        cloud.community = True
        wait_for(lambda: len(g.live_pods()) == 1, 60)
        assert all(usd_to_micros(p["cost"]) <= sold for p in g.pods())
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


class _SlowLaunch:
    """The mock RunPod, its createPod answering only when the test says (a slow cloud API)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.go, self.launching = inner, threading.Event(), 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def launch_spec(self, spec: Any) -> Any:
        self.launching += 1
        while not self.go.is_set():
            await asyncio.sleep(0.02)
        return await self.inner.launch_spec(spec)


def _free_4090s(g: GatewayWorld, free: dict[str, int]) -> None:
    for dc, count in free.items():
        answer = httpx.post(
            f"{g.mock.url}/admin/capacity",
            json={"gpu": "NVIDIA GeForce RTX 4090", "dataCenterId": dc, "count": count},
            headers={"Authorization": f"Bearer {g.mock.api_key}"},
        )
        assert answer.status_code == 200, answer.text


@pytest.fixture
def plain_gw(tmp_path: Path, sqlite_url: str) -> Iterator[GatewayWorld]:
    g = start_gateway_world(tmp_path, sqlite_url)
    yield g
    g.stop()


def test_the_last_gpu_is_not_sold_twice_while_its_first_launch_is_on_its_way(
    plain_gw: GatewayWorld,
) -> None:
    """Before the fix: a submit checked only that the cloud showed a GPU free; the one GPU
    left, already sold to a first buyer whose launch was still on its way, was sold again to a
    second, who paid and was then left `queued` (every launch refused for capacity) until its
    paid time ran out, the job failed and nothing came back."""
    gw = plain_gw
    _free_4090s(gw, {"US-TX-3": 1, "EU-RO-1": 0, "CA-MTL-1": 0})
    rt = gw.server.app.state.runtime
    rt.cloud = cloud = _SlowLaunch(rt.cloud)
    first = buy(gw, "first")
    wait_for(lambda: cloud.launching == 1)  # the first buyer's pod is being created
    q = quote(gw)
    asked = submit(gw, "second", q)
    assert asked.status_code == 402, asked.text
    late = buyer(gw, "second")
    before = gw.world.chain.balance_of(late.address)
    second = submit(
        gw, "second", q, signed_payment(gw, asked.headers["PAYMENT-REQUIRED"], late, nonce())
    )
    assert second.status_code == 409 and "capacity" in second.text, second.text
    assert gw.world.chain.balance_of(late.address) == before  # nothing moved
    cloud.go.set()
    wait_for(lambda: job_status(gw, first)["status"] == "completed", 60)
    wait_for(lambda: gw.live_pods() == [])


def test_a_renewal_is_priced_on_its_own_jobs_gpu_however_the_body_spells_its_fields(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: the renewal's check that its quote is for the job's GPU read the body's
    `jobId`, while the route also took `job_id` (the models populate by name): a renewal of an
    A100 job ($1.309/h) sent as `{"job_id", "quoteId"}` with a quote for an RTX 4090 ($0.374/h)
    was paid and booked, an hour of A100 sold for under a third of what it costs."""
    job = (sys.executable, TRAIN, "--steps", "600", "--step-time", "0.05")
    g = start_gateway_world(tmp_path, sqlite_url, command=job)
    try:
        a100 = quote(g, gpu="A100")
        asked = submit(g, "a100-job", a100)
        account = buyer(g, "renewer")
        paid = submit(
            g,
            "a100-job",
            a100,
            signed_payment(g, asked.headers["PAYMENT-REQUIRED"], account, nonce()),
        )
        assert paid.status_code == 200, paid.text
        job_id = paid.json()["jobId"]
        wait_for(lambda: job_status(g, job_id)["status"] == "running")
        cheap = quote(g, gpu="RTX4090")
        body = {"job_id": job_id, "quoteId": cheap["quoteId"]}
        headers = g.headers("cheap-slice", cheap["quoteId"])
        first = httpx.post(f"{g.url}/renew-job", json=body, headers=headers, timeout=30)
        if first.status_code == 402:  # the 402 asks for the cheap quote: the payment is refused
            headers["PAYMENT-SIGNATURE"] = signed_payment(
                g, first.headers["PAYMENT-REQUIRED"], account, nonce()
            )
            renewed = httpx.post(f"{g.url}/renew-job", json=body, headers=headers, timeout=30)
            assert renewed.status_code == 400 and "A100" in renewed.text, renewed.text
        else:
            assert first.status_code == 400 and "A100" in first.text, first.text
        assert job_status(g, job_id)["paidHours"] == pytest.approx(a100["hours"])
        assert [t["value"] for t in paid_out(g)] == [usd_to_micros(a100["amount"])]
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()
