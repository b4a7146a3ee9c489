"""A paid job that never ran (no instance could be launched for it within its paid time: every
launch refused, the account out of capacity, quota or credit) bought nothing: what its buyer paid
is booked as owed back (`refund_owed`), shown on its status and in the operator's figures, never
as income."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from procure.gateway import book
from procure.models import usd_to_micros
from procure.store.gateway_tables import GatewayPaymentRow
from test_gateway import (
    TRAIN,
    buy,
    buyer,
    fault,
    job_status,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)


def test_a_job_no_instance_was_launched_for_is_owed_back_not_income(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Before the fix: a job sold and paid, whose every launch the cloud refused until its paid
    time ran out, ended `failed` ("no instance could be launched within the paid time") with
    its payment booked as income: the buyer charged for no compute at all, the operator's
    figures showing a sale with a margin for it, and nothing owed back."""
    g = start_gateway_world(tmp_path, sqlite_url)
    try:
        fault(g, endpoints=["create"], status=400)  # every launch refused, in every region
        q = quote(g, hours=0.05)  # three seconds of paid time (an hour is 60 s here)
        first = submit(g, "never-ran", q)
        account = buyer(g, "never-ran")
        paid = submit(
            g,
            "never-ran",
            q,
            signed_payment(g, first.headers["PAYMENT-REQUIRED"], account, nonce()),
        )
        assert paid.status_code == 200, paid.text
        job_id = paid.json()["jobId"]
        failed = wait_for(lambda: (s := job_status(g, job_id))["status"] == "failed" and s, 60)
        assert "no instance could be launched within the paid time" in failed["error"]
        assert g.pods() == []  # nothing ran, nothing was billed
        assert failed.get("refundOwedUsd") == pytest.approx(q["amount"]), failed
        with g.store.session() as s:
            [payment] = s.query(GatewayPaymentRow).filter_by(job_id=job_id).all()
            assert payment.status == book.REFUND_OWED
            row = book.job(s, job_id)
            assert row is not None and any(account.address in line for line in row.logs)
        figures = book.figures(g.store)
        assert figures["incomeUsd"] == 0 and figures["paymentsReceived"] == 0, figures
        assert usd_to_micros(figures["refundsOwedUsd"]) == usd_to_micros(q["amount"])
        assert figures["refundsOwed"] == 1
    finally:
        fault(g)
        g.stop()


def test_a_job_that_ran_until_its_paid_time_was_over_is_not_owed_back(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The other side: a job that ran on its instance until its paid time was over used what
    it bought; its payment stays income, nothing owed back."""
    long_job = (sys.executable, TRAIN, "--steps", "4000", "--step-time", "0.05")
    g = start_gateway_world(tmp_path, sqlite_url, command=long_job)
    try:
        job_id = buy(g, "ran", hours=0.1)  # six seconds of paid time
        ended = wait_for(lambda: (s := job_status(g, job_id))["status"] == "expired" and s, 60)
        assert "refundOwedUsd" not in ended, ended
        figures = book.figures(g.store)
        assert figures["refundsOwed"] == 0 and figures["paymentsReceived"] == 1, figures
    finally:
        g.stop()
