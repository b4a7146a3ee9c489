"""The limits of holding a job for a payment in doubt: the gateway's hold of a job whose renewal
is being settled (not free, not chainable, not ended before the booking) and the payment it
books only if it paid the gateway in full; the agent's wait for a seller to book a settled
slice, bounded by the slice's authorisation. Driven on a hand-made book (a fake cloud, node
and ledger) to reach each moment exactly; each was a bug found in review."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from procure.agent.tick import tick
from procure.gateway import book
from procure.gateway import loop as gateway_loop
from procure.gateway.instances import advance
from procure.gateway.runtime import Runtime
from procure.gateway.settings import GatewayConfig
from procure.models import JobStatus, PaymentStatus, utcnow
from procure.payments.settlements import Settlement
from procure.store import Store, open_store
from procure.store.gateway_tables import GatewayInstanceRow, GatewayJobRow, GatewayPaymentRow
from procure.store.tables import PaymentRow
from procure.vendors.protocol import VendorJob
from test_payment_in_doubt_ticks import FakeLedger as TickLedger
from test_payment_in_doubt_ticks import FakeVendor, _deps, _job, _payment, _store, world
from world import World, state_of

__all__ = ["world"]  # the scripted-tick tests' store, two mock vendors and a facilitator

HOUR_S = 600.0  # a paid hour is 600 wall seconds here: longer than any hold, as in life
PAYER = "0x" + "ab" * 20


class FakeCloud:
    """The cloud as the loop uses it when a job runs or ends: terminations are recorded."""

    billing_increment_s = 1

    def __init__(self) -> None:
        self.terminated: list[str] = []

    async def terminate(self, ids: list[str]) -> None:
        self.terminated.extend(ids)

    async def billed(self, instance_id: str) -> int | None:
        return None

    async def find(self, name: str) -> list[Any]:
        return []

    async def get(self, instance_id: str) -> Any:
        return None

    async def labelled(self) -> list[Any]:
        return []


class FakeNode:
    """The node's job runner: the job runs on at half way."""

    async def __aenter__(self) -> FakeNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def status(self, job_id: str) -> dict[str, Any]:
        return {"status": "running", "progress": 0.5}

    async def logs(self, job_id: str, *, after: int = 0, limit: int = 200) -> dict[str, Any]:
        return {"next": after, "lines": []}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return {"status": "cancelled"}


PAY_TO = "0x" + "11" * 20


class FakeLedger:
    """The facilitator's ledger: the nonces in `used` settled (to the gateway, in full)."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}

    async def lookup(self, payer: str, nonce: str) -> Settlement:
        if nonce in self.used:
            return Settlement(True, "0x" + "cd" * 32, self.used[nonce], PAY_TO)
        return Settlement(False, None)


def _runtime(sqlite_url: str, ledger: FakeLedger) -> Runtime:
    cfg = GatewayConfig(
        vendor_id="gw1",
        secret="s3cret",
        provider="runpod",
        pay_to=PAY_TO,
        network="eip155:84532",
        asset="0x" + "22" * 20,
        asset_extra={},
        node_key="node-key",
        hour_s=HOUR_S,
    )
    store: Store = open_store(sqlite_url)
    return Runtime(
        cfg=cfg,
        store=store,
        cloud=FakeCloud(),  # type: ignore[arg-type]
        ledger=ledger,  # type: ignore[arg-type]
        node=lambda url, token, host: FakeNode(),  # type: ignore[arg-type,return-value]
    )


def _running_job(rt: Runtime, paid_until: datetime) -> str:
    """A job sold for one paid hour, running on its instance, its paid time ending at
    `paid_until`."""
    now = utcnow()
    job_id = "gw-review-s8c-0001"
    with rt.store.session() as s:
        s.add(
            GatewayJobRow(
                job_id=job_id,
                key="job-1",
                quote_id="q_1",
                gpu="RTX4090",
                payer=PAYER,
                nonce="0x" + "01" * 32,
                params={},
                resume_from=None,
                status="running",
                paid_hours=1.0,
                amount=1_000_000,
                paid_until=paid_until,
                attempt=1,
                tried_regions=[],
                progress=0.5,
                logs=[],
                log_cursor=0,
                cancel_requested=0,
                created_at=paid_until - timedelta(seconds=HOUR_S + 30),
                updated_at=now,
            )
        )
        s.add(
            GatewayPaymentRow(
                nonce="0x" + "01" * 32,
                job_id=job_id,
                kind="submit",
                key="job-1",
                payer=PAYER,
                amount=1_000_000,
                hours=1.0,
                transaction="0x" + "ee" * 32,
                status="completed",
                created_at=paid_until - timedelta(seconds=HOUR_S + 30),
            )
        )
        s.add(
            GatewayInstanceRow(
                name=rt.cfg.instance_name("job-1", 1),
                job_id=job_id,
                provider="runpod",
                region="EU",
                offer={},
                price_per_hour=900_000,
                instance_id="pod-1",
                status="running",
                node_url="http://127.0.0.1:9",
                node_job_id="node-job-1",
                launched_at=paid_until - timedelta(seconds=HOUR_S),
                created_at=paid_until - timedelta(seconds=HOUR_S + 20),
            )
        )
    return job_id


def _renewal(rt: Runtime, job_id: str, age_s: float, nonce_byte: str = "02") -> str:
    """A renewal of one hour, verified and being settled (`pending`), written `age_s` ago."""
    nonce = "0x" + nonce_byte * 32
    with rt.store.session() as s:
        book.add_payment(
            s,
            nonce=nonce,
            job_id=job_id,
            kind="renew",
            key=f"slice-{nonce_byte}",
            payer=PAYER,
            amount=1_000_000,
            hours=1.0,
        )
        s.flush()
        row = s.get(GatewayPaymentRow, nonce)
        assert row is not None
        row.created_at = utcnow() - timedelta(seconds=age_s)
    return nonce


def _gw_job(rt: Runtime, job_id: str) -> GatewayJobRow:
    with rt.store.session() as s:
        row = s.get(GatewayJobRow, job_id)
        assert row is not None
        return row


def _gw_payment(rt: Runtime, nonce: str) -> GatewayPaymentRow | None:
    with rt.store.session() as s:
        return s.get(GatewayPaymentRow, nonce)


def test_gateway_hold_is_not_free_time_once_the_renewal_settles(sqlite_url: str) -> None:
    """A renewal's settle answer was lost 305 s ago, just before the job's paid hour ran out;
    the job was kept (running on, on its instance) for the 300 s since. The renewal then
    settles and is booked: it buys one more hour, counted from where the paid time ran out,
    not from now. Else the hold's 300 s of GPU time were given away (a buyer pays for 1 h and
    gets 1 h 5 min; the gateway pays the cloud for it)."""
    ledger = FakeLedger()
    rt = _runtime(sqlite_url, ledger)
    ran_out = utcnow() - timedelta(seconds=300)
    job_id = _running_job(rt, ran_out)
    nonce = _renewal(rt, job_id, age_s=305)

    asyncio.run(advance(rt, job_id))
    assert _gw_job(rt, job_id).status == "running"  # kept while the renewal is in doubt
    ledger.used[nonce] = 1_000_000
    asyncio.run(gateway_loop.recover_payments(rt))

    job = _gw_job(rt, job_id)
    assert job.paid_hours == pytest.approx(2.0)
    assert job.paid_until is not None
    given_s = (job.paid_until - ran_out).total_seconds()
    assert given_s == pytest.approx(HOUR_S, abs=5), (
        f"the renewal of 1 h ({HOUR_S:g} s) extended the job by {given_s:.0f} s past where its "
        "paid time ran out: the hold was free"
    )


def test_gateway_does_not_end_a_job_whose_renewal_settled_but_is_not_booked_yet(
    sqlite_url: str,
) -> None:
    """The renewal was settled on chain within its window (the facilitator's answer lost), but
    the loop's reconciliation (every `sweep_every_s`) has not looked since. 331 s after the
    renewal was made the hold must not let go on time alone (the job would end, and then the
    renewal's hour be booked on an ended job: paid for, never given)."""
    ledger = FakeLedger()
    rt = _runtime(sqlite_url, ledger)
    job_id = _running_job(rt, utcnow() - timedelta(seconds=320))
    nonce = _renewal(rt, job_id, age_s=331)
    ledger.used[nonce] = 1_000_000  # it settled (within 305 s of being signed)

    asyncio.run(advance(rt, job_id))  # the loop's step comes before its next recovery
    asyncio.run(gateway_loop.recover_payments(rt))
    asyncio.run(advance(rt, job_id))

    job = _gw_job(rt, job_id)
    paid = _gw_payment(rt, nonce)
    assert paid is not None and paid.status == "completed"  # money that moved is booked
    assert job.status not in ("ending", "expired"), (
        f"the job ended {job.outcome or job.status} with a settled renewal of it booked "
        f"after (paid hours {job.paid_hours:g}); logs: {job.logs[-2:]}"
    )


def test_gateway_hold_is_bounded_by_the_first_renewal_not_chained(sqlite_url: str) -> None:
    """The hold is '330 s at most'. A buyer whose renewals all stay in doubt (never settle)
    sends a new one every five minutes while the job is kept (the renew route accepts them:
    the job still shows `running`): each new pending renewal restarts the 330 s. Here the
    paid time ran out 1000 s ago, just after a renewal that never settled; three more made
    while it was kept never settled either, and the job still runs on the gateway's instance
    for nothing (it would run on as long as the buyer keeps this up)."""
    ledger = FakeLedger()
    rt = _runtime(sqlite_url, ledger)
    job_id = _running_job(rt, utcnow() - timedelta(seconds=1000))
    for age_s, byte in ((1010, "02"), (700, "03"), (400, "04"), (100, "05")):
        _renewal(rt, job_id, age_s=age_s, nonce_byte=byte)
    asyncio.run(gateway_loop.recover_payments(rt))  # the old ones: unused, dropped

    asyncio.run(advance(rt, job_id))

    job = _gw_job(rt, job_id)
    assert job.status in ("ending", "expired"), (
        f"paid time ran out 1000 s ago and the job is still {job.status} "
        f"(held by a chain of renewals that never settled); logs: {job.logs[-1:]}"
    )


def test_settled_slice_does_not_hold_an_expired_job_long_past_its_authorisation(
    world: World,
) -> None:
    """A hostile seller answered a slice's paid renewal 503 with Retry-After 600 (the most the
    client accepts) 400 s ago. The authorisation expired 100 s ago (a 300 s window): the ledger
    then showed the slice settled and the agent booked it 60 s ago. The seller reports the job
    `expired` short of its paid progress. Nothing can settle any more, the settlement has been
    public for 60 s (twice `BOOKING_GRACE_S`), and `settling_wait` itself stops honouring a
    Retry-After once the authorisation expired; yet the job is kept, idle, for 230 s more
    (until the seller's 600 s plus 30 s): every answer of 600 s stalls a run ~10 minutes."""
    run_id = world.new_run(gpu_type="H100")
    job = _job(world, run_id, JobStatus.running, 0.25)
    first = _payment(job, PaymentStatus.completed, 900)
    slice_ = _payment(
        job,
        PaymentStatus.completed,
        400,
        x402_tx_id="0x" + "ab" * 32,
        ask_again_at=utcnow() + timedelta(seconds=200),
    )
    _store(world, job, first, slice_)
    with world.store.session() as s:
        s.execute(
            update(PaymentRow)
            .where(PaymentRow.id == slice_.id)
            .values(updated_at=utcnow() - timedelta(seconds=60))
        )
    expired = VendorJob(job_id="vj-1", status="expired", progress=0.25)
    deps = _deps(world, FakeVendor(expired), TickLedger())

    message = asyncio.run(tick(deps, run_id)).message
    [stored] = state_of(world, run_id).jobs
    assert stored.status != "running", message


def test_gateway_books_no_hours_for_a_nonce_used_by_another_transfer(sqlite_url: str) -> None:
    """Pre-existing, on the booking path the hold relies on (`recover_payments`, and
    `sales.book_settlement` alike): the ledger is asked whether the buyer's *nonce* was used,
    and a used nonce is booked as this payment. A hostile buyer whose renewal is in doubt
    (or who races the gateway's settle) uses the same nonce in another authorisation of its
    own, 1 micro-USD to itself (the local facilitator's /settle is open; on a real chain
    anyone may submit it): the ledger says used, amount 1. The gateway books the renewal at
    1 micro-USD and gives the full paid hour for it."""
    ledger = FakeLedger()
    rt = _runtime(sqlite_url, ledger)
    job_id = _running_job(rt, utcnow() + timedelta(seconds=30))
    nonce = _renewal(rt, job_id, age_s=20)
    ledger.used[nonce] = 1  # the nonce moved 1 micro-USD, not to the gateway's quote

    asyncio.run(gateway_loop.recover_payments(rt))

    job = _gw_job(rt, job_id)
    assert job.paid_hours == pytest.approx(1.0), (
        f"a renewal quoted at 1_000_000 was booked as paid ({job.amount - 1_000_000} "
        f"micro-USD moved) and bought {job.paid_hours - 1:g} h more"
    )
