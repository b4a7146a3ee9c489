"""A job whose paid time runs out while its renewal's settlement is in doubt (the settle answer
lost, the payment `pending` at the gateway) is kept until that payment is known: booked → the
time is added and the job runs on to its end on the same instance; never settled → it ends when
the payment's window passes, and nothing is booked for it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.gateway.serve as gateway_serve
from procure.gateway import book
from procure.gateway import loop as gateway_loop
from procure.models import usd_to_micros, utcnow
from procure.store.gateway_tables import GatewayJobRow
from test_gateway import (
    TRAIN,
    GatewayWorld,
    buyer,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)
from test_unknown_settlement import FlakySettle, flaky_client, paid_out, payment_for, pending

# Long enough to still be running when its first paid time is made to run out, short enough to
# complete soon after the renewal is booked (a paid hour is 60 s here).
JOB = (sys.executable, TRAIN, "--steps", "160", "--step-time", "0.05", "--checkpoint-every", "40")
KEPT = "kept while a renewal's payment is being settled"


def flaky_gateway(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> Iterator[tuple[GatewayWorld, FlakySettle]]:
    """A gateway world running `command` whose facilitator client's settle answers can be held
    or lost (`FlakySettle`); stopped after."""
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    g = start_gateway_world(tmp_path, sqlite_url, command=command)
    yield g, clients[0]
    g.stop()


@pytest.fixture
def doubt_gw(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GatewayWorld, FlakySettle]]:
    yield from flaky_gateway(tmp_path, sqlite_url, monkeypatch, JOB)


def job_status(gw: GatewayWorld, job_id: str) -> dict[str, Any]:
    answer = httpx.get(
        f"{gw.url}/job-status", params={"jobId": job_id}, headers=gw.headers(), timeout=15
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def running_job(gw: GatewayWorld, account: Any) -> tuple[str, dict[str, Any]]:
    """A paid job, once it runs on its instance; its id and quote."""
    q = quote(gw)
    paid = submit(gw, "job-1", q, payment_for(gw, "job-1", q, account))
    assert paid.status_code == 200, paid.text
    job_id = paid.json()["jobId"]
    wait_for(lambda: job_status(gw, job_id)["status"] == "running")
    return job_id, q


def renew_in_doubt(
    gw: GatewayWorld, job_id: str, account: Any
) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """A renewal whose settle answer never arrives: the buyer is told to come back (503) and
    the gateway keeps the payment pending. Its quote, body and paid headers (for replays)."""
    q = quote(gw)
    body = {"jobId": job_id, "quoteId": q["quoteId"]}
    headers = gw.headers("slice-1", q["quoteId"])
    asked = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert asked.status_code == 402, asked.text
    headers["PAYMENT-SIGNATURE"] = signed_payment(
        gw, asked.headers["PAYMENT-REQUIRED"], account, nonce()
    )
    doubt = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert doubt.status_code == 503 and "Retry-After" in doubt.headers, doubt.text
    assert len(pending(gw)) == 1
    return q, body, headers


def run_out_of_paid_time(gw: GatewayWorld, job_id: str) -> None:
    """The job's paid time ended just as its renewal was made (rather than waiting out a paid
    hour): a renewal made within the paid time is the one that holds a job past it."""
    with gw.store.session() as s:
        row = s.get(GatewayJobRow, job_id)
        assert row is not None and row.paid_until is not None
        renewal = book.renewal_in_doubt(s, job_id, utcnow() - timedelta(hours=1), utcnow())
        assert renewal is not None
        row.paid_until = renewal.created_at


def kept_or_ended(gw: GatewayWorld, job_id: str) -> dict[str, Any] | None:
    """The job once the loop has judged its paid time: kept (its log says so) or ended."""
    job = job_status(gw, job_id)
    ended = job["status"] not in ("queued", "running")
    return job if ended or any(KEPT in line for line in job["logs"]) else None


def test_a_renewal_settled_late_keeps_the_job_running_to_its_end(
    doubt_gw: tuple[GatewayWorld, FlakySettle],
) -> None:
    gw, facilitator = doubt_gw
    account = buyer(gw, "a")
    job_id, q1 = running_job(gw, account)
    facilitator.mode = "held"  # the facilitator settles only when released, after a timeout
    q2, body, headers = renew_in_doubt(gw, job_id, account)
    run_out_of_paid_time(gw, job_id)
    # The renewal may yet settle: the job is not stopped for running out of paid time.
    job = wait_for(lambda: kept_or_ended(gw, job_id))
    assert job["status"] == "running", job
    assert len(gw.live_pods()) == 1
    # The buyer asking again meanwhile is told to come back, and pays nothing more.
    retry = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert retry.status_code == 409 and "Retry-After" in retry.headers, retry.text
    assert job_status(gw, job_id)["status"] == "running"
    # The facilitator settles it: the loop books it from the ledger, the time is added.
    assert facilitator.release(gw.world.facilitator.url) == 1
    wait_for(lambda: pending(gw) == [])
    replay = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert replay.status_code == 200, replay.text
    assert replay.headers.get("X-Idempotent-Replay") == "true"
    assert replay.json()["paidHours"] == pytest.approx(q1["hours"] + q2["hours"])
    assert replay.json()["status"] in ("running", "completed")
    # ... and the job runs on to its end, on the instance it had.
    wait_for(lambda: job_status(gw, job_id)["status"] == "completed")
    wait_for(lambda: gw.live_pods() == [])
    figures = book.figures(gw.store)
    assert figures["instancesLaunched"] == 1 and len(gw.pods()) == 1
    # Both payments moved once and are booked once.
    amounts = sorted(t["value"] for t in paid_out(gw))
    assert amounts == sorted(usd_to_micros(q["amount"]) for q in (q1, q2))
    assert figures["paymentsReceived"] == 2
    assert usd_to_micros(figures["incomeUsd"]) == sum(amounts)


def test_a_renewal_never_settled_ends_the_job_when_its_window_passes(
    doubt_gw: tuple[GatewayWorld, FlakySettle], monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, facilitator = doubt_gw
    account = buyer(gw, "b")
    job_id, q1 = running_job(gw, account)
    facilitator.mode = "dropped"  # the settle times out and nothing ever moves
    _, body, headers = renew_in_doubt(gw, job_id, account)
    run_out_of_paid_time(gw, job_id)
    job = wait_for(lambda: kept_or_ended(gw, job_id))
    assert job["status"] == "running", job
    # Its authorisation can no longer be used: the loop drops it, and the job ends as unpaid
    # time does.
    monkeypatch.setattr(gateway_loop, "AUTH_WINDOW_S", 0.5)
    wait_for(lambda: pending(gw) == [])
    wait_for(lambda: job_status(gw, job_id)["status"] == "expired")
    wait_for(lambda: gw.live_pods() == [])
    job = job_status(gw, job_id)
    assert job["paidHours"] == pytest.approx(q1["hours"])
    figures = book.figures(gw.store)
    assert figures["paymentsReceived"] == 1 and figures["instancesLaunched"] == 1
    assert usd_to_micros(figures["incomeUsd"]) == usd_to_micros(q1["amount"])
    assert [t["value"] for t in paid_out(gw)] == [usd_to_micros(q1["amount"])]
    # The same renewal again: the job has ended, so it sells nothing more.
    again = httpx.post(f"{gw.url}/renew-job", json=body, headers=headers, timeout=30)
    assert again.status_code == 409, again.text
    assert [t["value"] for t in paid_out(gw)] == [usd_to_micros(q1["amount"])]
