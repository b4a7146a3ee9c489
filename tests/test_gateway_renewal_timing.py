"""The gateway's renewals and the paid time: the real facilitator's ledger answer is accepted
by `settlements.paid_to` for the gateway's own address (in any case form); a renewal booked
while the job boots keeps its hours; a renewal offered once the paid time ran out is refused
before money moves. Each but the first was a bug found in review."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from procure.clouds.base import Instance
from procure.gateway import book, sales
from procure.gateway.instances import advance
from procure.gateway.runtime import Runtime
from procure.local import LocalServer, start_facilitator
from procure.models import utcnow
from procure.payments.payer import payment_nonce
from procure.payments.settlements import FacilitatorLedger, paid_to
from procure.store.gateway_tables import GatewayInstanceRow, GatewayJobRow, GatewayQuoteRow
from test_facilitator_http import PAYEE, signed_payment
from test_gateway_hold_limits import (
    HOUR_S,
    PAYER,
    FakeCloud,
    FakeLedger,
    _gw_job,
    _gw_payment,
    _renewal,
    _running_job,
    _runtime,
)


@pytest.fixture
def facilitator(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_facilitator(tmp_path / "journal.jsonl")
    yield server
    server.stop()


def test_real_ledger_answer_is_accepted_as_paid_to_the_seller(facilitator: LocalServer) -> None:
    """Confirms (passes): a payment settled by the real local facilitator, looked up through
    `FacilitatorLedger`, is recognised by `paid_to` whatever the letter case of the seller's
    address, and only for its exact amount."""
    body = signed_payment(facilitator, "review-s8d", amount=1_400_000)
    settled = httpx.post(f"{facilitator.url}/settle", json=body, timeout=30).json()
    assert settled["success"] is True, settled
    payer = Account.from_key("0x" + "42" * 32).address

    async def look() -> None:
        ledger = FacilitatorLedger(facilitator.url)
        try:
            for who in (payer, payer.lower()):
                found = await ledger.lookup(who, payment_nonce("review-s8d"))
                assert found.used and found.transaction == settled["transaction"]
                for seller in (PAYEE, PAYEE.lower(), "0x" + PAYEE[2:].upper()):
                    assert paid_to(found, seller, 1_400_000), (found, seller)
                assert not paid_to(found, PAYEE, 1_399_999)
                assert not paid_to(found, "0x" + "11" * 20, 1_400_000)
        finally:
            await ledger.aclose()

    asyncio.run(look())


def test_a_renewal_offered_after_the_paid_time_ran_out_is_refused_before_money_moves(
    sqlite_url: str,
) -> None:
    """The job's paid time ran out 1 s ago; the loop (every `poll_s`, longer when a node or
    the cloud is slow) has not judged it yet, so it still shows `running`. A renewal offered
    now could hold nothing (the job ends at the loop's next look), so, settled, it would be an
    hour charged on an ended job: the route refuses it with 409 before any money moves."""
    ledger = FakeLedger()
    rt = _runtime(sqlite_url, ledger)
    job_id = _running_job(rt, utcnow() - timedelta(seconds=1))
    quote = GatewayQuoteRow(quote_id="q-late", hours=1.0, amount=1_000_000)
    auth = {"nonce": "0x" + "07" * 32, "from": PAYER, "value": 1_000_000}

    refused = sales.new_renewal(rt, job_id, quote, auth, "slice-07")

    assert refused is not None and refused[0] == 409, refused
    assert "paid time ran out" in refused[1]
    assert _gw_payment(rt, auth["nonce"]) is None  # nothing pending, nothing to book later


class BootedCloud(FakeCloud):
    """The instance is up, its node answering: the job can be handed to it."""

    async def get(self, instance_id: str) -> Instance:
        return Instance(
            id=instance_id,
            name=None,
            status="active",
            instance_type="gpu_1x",
            region="EU",
            ip="127.0.0.1",
            price_per_hour=900_000,
            node_url="http://127.0.0.1:9",
        )


class RenewedMeanwhileNode:
    """The node takes the job; while it is being handed over (the loop awaits it), the buyer's
    renewal is booked by the renew route, as an HTTP handler on the same event loop would."""

    def __init__(self, rt: Runtime, nonce: str) -> None:
        self.rt, self.nonce = rt, nonce

    async def __aenter__(self) -> RenewedMeanwhileNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def submit(self, **_: object) -> dict[str, str]:
        with self.rt.store.session() as s:
            assert book.settled(s, self.nonce, "0x" + "cd" * 32, HOUR_S) is not None
        return {"id": "node-job-1"}


def _booting(sqlite_url: str, paid_until_s: float | None) -> tuple[Runtime, str, str]:
    """A job of one paid hour whose instance is booting (first boot: no `paid_until` yet; a
    relaunch after a lost instance: `paid_until` `paid_until_s` from now), and a renewal of
    one hour for it, verified and being settled."""
    rt = _runtime(sqlite_url, FakeLedger())
    job_id = _running_job(rt, utcnow() + timedelta(seconds=paid_until_s or HOUR_S))
    with rt.store.session() as s:
        job = s.get(GatewayJobRow, job_id)
        assert job is not None
        job.status = "booting"
        job.paid_until = None if paid_until_s is None else job.paid_until
        job.created_at = utcnow() - timedelta(seconds=10)
        inst = s.get(GatewayInstanceRow, rt.cfg.instance_name("job-1", 1))
        assert inst is not None
        inst.status, inst.node_url, inst.node_job_id = "booting", None, None
        inst.launched_at = utcnow() - timedelta(seconds=5)
    nonce = _renewal(rt, job_id, age_s=1)
    rt.cloud = BootedCloud()  # type: ignore[assignment]
    rt.node = lambda url, token, host: RenewedMeanwhileNode(rt, nonce)  # type: ignore[assignment,return-value]
    return rt, job_id, nonce


@pytest.mark.parametrize("paid_until_s", [None, 0.5 * HOUR_S], ids=["first-boot", "relaunch"])
def test_renewal_booked_while_the_job_boots_keeps_its_hour(
    sqlite_url: str, paid_until_s: float | None
) -> None:
    """`_boot` reads the job, awaits the cloud and the node, then writes `paid_until` computed
    from what it read (`row.paid_until or now + row.paid_hours`). A renewal booked by the route
    during those awaits (`book.settled`: `paid_hours` + 1 and, on a relaunch, `paid_until`
    + 1 h) is overwritten: the buyer paid for an hour the job never gets."""
    rt, job_id, nonce = _booting(sqlite_url, paid_until_s)

    asyncio.run(advance(rt, job_id))

    job = _gw_job(rt, job_id)
    payment = _gw_payment(rt, nonce)
    assert payment is not None and payment.status == "completed"
    assert job.status == "running" and job.paid_hours == pytest.approx(2.0)
    assert job.paid_until is not None
    left_s = (job.paid_until - utcnow()).total_seconds()
    owed_s = HOUR_S + (HOUR_S if paid_until_s is None else paid_until_s)
    assert left_s == pytest.approx(owed_s, abs=30), (
        f"the job runs {left_s:.0f} s more, it was paid {owed_s:.0f} s more: the renewal "
        "booked while it booted was lost"
    )
