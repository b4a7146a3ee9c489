"""A renewal whose payment settles once its job has already ended (completed, failed or
cancelled) buys nothing: the gateway books it as a refund owed to its payer (the job's log, the
book's figures and `/metrics` say so), never as income or as paid time on the ended job. One
whose job was kept running past its paid time while it was being settled was used: income."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.gateway.serve as gateway_serve
import procure.local as local
from procure.gateway import book
from procure.models import usd_to_micros, utcnow
from procure.store.gateway_tables import GatewayJobRow, GatewayPaymentRow
from test_gateway import (
    TRAIN,
    GatewayWorld,
    buyer,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    wait_for,
)
from test_gateway_renewal_in_doubt import flaky_gateway, job_status
from test_unknown_settlement import FlakySettle, paid_out, payment_for, pending

# Running long enough for a renewal to be asked while it runs, ending soon after on its own.
JOB = (sys.executable, TRAIN, "--steps", "120", "--step-time", "0.05", "--checkpoint-every", "30")


class SettlesOnceEnded:
    """The facilitator's client, its settle call slow: it reaches the facilitator only once the
    job `job_id` has ended in the gateway's book (as a settle that takes a while on a loaded
    chain can), then settles for real."""

    def __init__(self, inner: Any, store: Any) -> None:
        self.inner, self.store = inner, store
        self.job_id: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ended(self) -> bool:
        with self.store.session() as s:
            row = s.get(GatewayJobRow, self.job_id)
            return row is not None and row.status in book.TERMINAL

    async def settle(self, payload: Any, requirements: Any) -> Any:
        if self.job_id is not None:
            for _ in range(1200):  # a minute at most: then it settles anyway
                if await asyncio.to_thread(self.ended):
                    break
                await asyncio.sleep(0.05)
        return await self.inner.settle(payload, requirements)


@pytest.fixture
def slow_gw(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GatewayWorld, SettlesOnceEnded]]:
    clients: list[SettlesOnceEnded] = []
    real = local.facilitator_client

    def make(url: str, timeout_s: float = 10.0) -> SettlesOnceEnded:
        clients.append(SettlesOnceEnded(real(url, timeout_s), None))
        return clients[-1]

    monkeypatch.setattr(gateway_serve, "facilitator_client", make)
    g = start_gateway_world(tmp_path, sqlite_url, command=JOB)
    clients[0].store = g.store
    yield g, clients[0]
    g.stop()


@pytest.fixture
def held_gw(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GatewayWorld, FlakySettle]]:
    yield from flaky_gateway(tmp_path, sqlite_url, monkeypatch, JOB)


def paid_job(gw: GatewayWorld, account: Any) -> tuple[str, dict[str, Any]]:
    """A job bought by `account`, not yet running; its id and quote."""
    q = quote(gw)
    paid = httpx.post(
        f"{gw.url}/submit-job",
        json={"quoteId": q["quoteId"], "jobParams": {"epochs": 2}},
        headers={
            **gw.headers("job-1", q["quoteId"]),
            "PAYMENT-SIGNATURE": payment_for(gw, "job-1", q, account),
        },
        timeout=30,
    )
    assert paid.status_code == 200, paid.text
    return str(paid.json()["jobId"]), q


def running(gw: GatewayWorld, job_id: str) -> None:
    wait_for(lambda: job_status(gw, job_id)["status"] == "running", 60)


def renewal(
    gw: GatewayWorld, job_id: str, account: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """A renewal of the job, signed: its quote, body and paid headers."""
    q = quote(gw)
    body = {"jobId": job_id, "quoteId": q["quoteId"]}
    headers = gw.headers("slice-1", q["quoteId"])
    asked = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert asked.status_code == 402, asked.text
    headers["PAYMENT-SIGNATURE"] = signed_payment(
        gw, asked.headers["PAYMENT-REQUIRED"], account, nonce()
    )
    return q, body, headers


def assert_refund_owed(
    gw: GatewayWorld,
    job_id: str,
    q1: dict[str, Any],
    q2: dict[str, Any],
    ended: str = "completed",
) -> None:
    """Both payments moved; the first is income, the renewal a refund owed, shown."""
    moved = sorted(t["value"] for t in paid_out(gw))
    assert moved == sorted(usd_to_micros(q["amount"]) for q in (q1, q2))
    figures = book.figures(gw.store)
    assert usd_to_micros(figures["incomeUsd"]) == usd_to_micros(q1["amount"]), figures
    assert figures["paymentsReceived"] == 1, figures
    assert figures["refundsOwed"] == 1, figures
    assert usd_to_micros(figures["refundsOwedUsd"]) == usd_to_micros(q2["amount"]), figures
    job = job_status(gw, job_id)
    assert job["status"] == ended
    assert usd_to_micros(job["refundOwedUsd"]) == usd_to_micros(q2["amount"])
    assert job["paidHours"] == pytest.approx(q1["hours"])  # it bought no time
    assert any("refund owed" in line for line in job["logs"]), job["logs"]
    with gw.store.session() as s:
        owed = s.query(GatewayPaymentRow).filter(GatewayPaymentRow.kind == "renew").one()
        assert owed.status == "refund_owed" and owed.transaction
    lines = book.prometheus_lines(gw.store, "gw1")
    assert any(line.startswith("procure_gateway_refunds_owed_usd") for line in lines)


def test_a_renewal_settled_after_its_job_completed_is_a_refund_owed(
    slow_gw: tuple[GatewayWorld, SettlesOnceEnded],
) -> None:
    """Before the fix: a renewal checked while its job ran, its settlement reaching the
    facilitator only once the job had completed, was booked as income and as paid hours on the
    completed job: the buyer was charged and given nothing, and nothing showed it."""
    gw, facilitator = slow_gw
    account = buyer(gw, "a")
    job_id, q1 = paid_job(gw, account)
    q2, body, headers = renewal(gw, job_id, account)  # signed before it runs: paid while it does
    running(gw, job_id)
    facilitator.job_id = job_id  # its settle waits for the job to end
    renewed = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=90)
    # The money moved (the answer carries the settlement), and the answer says it is owed back.
    assert renewed.status_code == 200, renewed.text
    assert renewed.headers.get("PAYMENT-RESPONSE")
    assert renewed.json()["status"] == "completed"
    assert usd_to_micros(renewed.json()["refundOwedUsd"]) == usd_to_micros(q2["amount"])
    assert_refund_owed(gw, job_id, q1, q2)
    # The same renewal again is its replay: nothing more is charged or owed.
    again = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert again.status_code == 200 and again.headers.get("X-Idempotent-Replay") == "true"
    assert_refund_owed(gw, job_id, q1, q2)


def test_a_renewal_found_settled_after_its_job_completed_is_a_refund_owed(
    held_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    """Before the fix: a renewal whose settle answer was lost (the buyer told to come back),
    found settled by the loop only after its job had completed, was booked as income and paid
    hours on the completed job, the buyer given nothing."""
    gw, facilitator = held_gw
    account = buyer(gw, "b")
    job_id, q1 = paid_job(gw, account)
    q2, body, headers = renewal(gw, job_id, account)  # signed before it runs: paid while it does
    running(gw, job_id)
    facilitator.mode = "held"  # the settle times out; it reaches the facilitator when released
    doubt = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert doubt.status_code == 503 and "Retry-After" in doubt.headers, doubt.text
    wait_for(lambda: job_status(gw, job_id)["status"] == "completed", 60)
    assert facilitator.release(gw.world.facilitator.url) == 1
    wait_for(lambda: pending(gw) == [], 60)
    assert_refund_owed(gw, job_id, q1, q2)
    again = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert again.status_code == 200 and again.headers.get("X-Idempotent-Replay") == "true"
    assert_refund_owed(gw, job_id, q1, q2)


def test_a_renewal_settled_after_its_buyer_cancelled_the_job_is_a_refund_owed(
    slow_gw: tuple[GatewayWorld, SettlesOnceEnded],
) -> None:
    """Before the fix: a job cancelled while its renewal was being settled kept the renewal as
    income and paid hours on the cancelled job: charged, nothing given."""
    gw, facilitator = slow_gw
    account = buyer(gw, "c")
    job_id, q1 = paid_job(gw, account)
    q2, body, headers = renewal(gw, job_id, account)  # signed before it runs: paid while it does
    running(gw, job_id)
    facilitator.job_id = job_id
    answers: list[httpx.Response] = []

    def renew() -> None:
        answers.append(httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=90))

    asking = threading.Thread(target=renew)
    asking.start()
    try:
        wait_for(lambda: pending(gw))  # checked and written: its settle waits for the job's end
        cancel = httpx.post(
            f"{gw.url}/cancel-job", json={"jobId": job_id}, headers=gw.headers(), timeout=15
        )
        assert cancel.status_code == 200, cancel.text
    finally:
        asking.join(120)
    [renewed] = answers
    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["status"] == "cancelled"
    assert_refund_owed(gw, job_id, q1, q2, ended="cancelled")


def test_a_renewal_whose_job_ran_past_its_paid_time_on_it_is_income_not_a_refund(
    held_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    """A job kept running past its paid time while its renewal was being settled ran on that
    renewal: booked once its job had completed, the renewal is income and paid time, as any
    renewal of a job that ends early is, never a refund owed."""
    gw, facilitator = held_gw
    account = buyer(gw, "d")
    job_id, q1 = paid_job(gw, account)
    q2, body, headers = renewal(gw, job_id, account)  # signed before it runs: paid while it does
    running(gw, job_id)
    facilitator.mode = "held"
    doubt = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert doubt.status_code == 503, doubt.text
    with gw.store.session() as s:  # its paid time ran out as the renewal was made
        row = s.get(GatewayJobRow, job_id)
        renewal_row = book.renewal_in_doubt(s, job_id, utcnow() - timedelta(hours=1), utcnow())
        assert row is not None and renewal_row is not None
        row.paid_until = renewal_row.created_at
    wait_for(lambda: job_status(gw, job_id)["status"] == "completed", 60)
    assert facilitator.release(gw.world.facilitator.url) == 1
    wait_for(lambda: pending(gw) == [], 60)
    figures = book.figures(gw.store)
    assert figures["refundsOwed"] == 0 and figures["paymentsReceived"] == 2, figures
    assert usd_to_micros(figures["incomeUsd"]) == sum(usd_to_micros(q["amount"]) for q in (q1, q2))
    job = job_status(gw, job_id)
    assert job["paidHours"] == pytest.approx(q1["hours"] + q2["hours"])
    assert "refundOwedUsd" not in job


def _job(job_id: str, status: str, now: Any, **fields: Any) -> GatewayJobRow:
    base: dict[str, Any] = {
        "job_id": job_id,
        "key": f"key-{job_id}",
        "quote_id": "q",
        "gpu": "A100",
        "payer": "0xabc",
        "nonce": f"0x{job_id}",
        "params": {},
        "status": status,
        "paid_hours": 1.0,
        "amount": 1_000_000,
        "attempt": 0,
        "tried_regions": [],
        "progress": 0.5,
        "logs": [],
        "log_cursor": 0,
        "cancel_requested": 0,
        "paid_until": now + timedelta(hours=1),
        "created_at": now,
        "updated_at": now,
    }
    return GatewayJobRow(**{**base, **fields})


def test_the_book_owes_back_a_renewal_of_an_ended_job_on_both_stores(db_url: str) -> None:
    """Before the fix: `book.settled` added a renewal's hours and amount to a job that had
    completed or been cancelled, and counted it as income. Now: owed back, once, on either
    store; a renewal of a running job, or one bought back after its paid time ran out, is
    income as before."""
    from procure.store import open_store

    store = open_store(db_url)
    try:
        now = utcnow()
        ended = {"status": "completed", "ended_at": now, "outcome": "completed"}
        jobs = {
            "done": _job("done", **ended, now=now),
            "cancelling": _job("cancelling", "running", now, cancel_requested=1),
            "running": _job("running", "running", now),
            "expired": _job(
                "expired", "expired", now, paid_until=now - timedelta(minutes=1), ended_at=now
            ),
        }
        with store.session() as s:
            for i, row in enumerate(jobs.values()):
                s.add(row)
                book.add_payment(
                    s,
                    nonce=f"0x{i:02d}",
                    job_id=row.job_id,
                    kind="renew",
                    key=f"slice-{i}",
                    payer="0xABC",
                    amount=500_000,
                    hours=0.5,
                )
        for _ in range(2):  # booked twice (a retry after a crash): once
            for i in range(len(jobs)):
                with store.session() as s:
                    book.settled(s, f"0x{i:02d}", f"0xtx{i}", 3600.0)
        figures = book.figures(store)
        assert figures["refundsOwed"] == 2 and figures["refundsOwedUsd"] == 1.0, figures
        assert figures["paymentsReceived"] == 2 and figures["incomeUsd"] == 1.0, figures
        with store.session() as s:
            hours = {j: book.job(s, j).paid_hours for j in jobs}  # type: ignore[union-attr]
            owed = {j: book.refund_owed(s, j) for j in jobs}
            assert book.renewed_job(s, "slice-0") is not None  # its key answers its job again
        assert hours == {"done": 1.0, "cancelling": 1.0, "running": 1.5, "expired": 1.5}
        assert owed == {"done": 500_000, "cancelling": 500_000, "running": 0, "expired": 0}
    finally:
        store.dispose()
