"""The gateway's loop: every poll it advances each paid job (`instances.advance`); now and then it
books payments a crash left between settlement and record (asking the facilitator) and sweeps:
terminates every instance carrying this gateway's label that no live job owns."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from procure.clouds.base import CloudError
from procure.gateway import book, storelease
from procure.gateway.instances import advance
from procure.gateway.pricing import instance_cost
from procure.gateway.runtime import Runtime
from procure.models import utcnow
from procure.payments.settlements import Settlement, SettlementLookupError, paid_to
from procure.store.gateway_tables import GatewayInstanceRow, GatewayPaymentRow

log = logging.getLogger(__name__)
AUTH_WINDOW_S = 330.0  # the payments' max_timeout_seconds (300) and a margin


# --- the loop ---------------------------------------------------------------------------------


async def run_loop(rt: Runtime, stop: asyncio.Event) -> None:
    """Advance every started job each poll (sooner when woken), sweep now and then."""
    last_sweep = 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        # Another gateway took the store (this one's lease lapsed): its book is not ours. Read
        # each pass, not only at the heartbeat: stepping the other's jobs for a third of a lease
        # would advance them on this gateway's cloud.
        if rt.holds_store:
            rt.holds_store = _still_ours(rt)
        if rt.holds_store and loop.time() - last_sweep >= rt.cfg.sweep_every_s:
            last_sweep = loop.time()
            await guarded(recover_payments(rt), "recover")
            await guarded(sweep(rt), "sweep")
        if rt.holds_store:
            await guarded(step_all(rt), "step")
        rt.wake.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(rt.wake.wait())]
        await asyncio.wait(waits, timeout=rt.cfg.poll_s, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()


def _still_ours(rt: Runtime) -> bool:
    """Whether the store's book is still this gateway's (a store that cannot be read now is
    taken as still ours: the loop's own reads meet the same trouble and retry)."""
    try:
        with rt.store.session() as s:
            return storelease.ours(s, rt.cfg)
    except Exception as exc:
        log.warning("reading whose store this is failed: %s", exc)
        return True


async def guarded(work: Any, what: str) -> None:
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception:  # one bad answer must not stop the loop that terminates instances
        log.exception("gateway %s failed", what)


async def step_all(rt: Runtime) -> None:
    with rt.store.session() as s:
        ids = book.started_job_ids(s)
    for job_id in ids:
        await guarded(advance(rt, job_id), f"job {job_id}")


# --- sweeper and payment recovery -------------------------------------------------------------


async def sweep(rt: Runtime) -> list[str]:
    """Terminate every instance carrying this gateway's label that no live job owns (a crash
    between launch and record, a lost terminate); the names terminated."""
    labelled = await rt.cloud.labelled()
    with rt.store.session() as s:
        keep = book.holding_names(s)
    done: list[str] = []
    for inst in labelled:
        name = inst.name or ""
        if not name.startswith(rt.cfg.label) or name in keep or inst.status == "terminated":
            continue
        try:
            await rt.cloud.terminate([inst.id])
        except CloudError as exc:
            log.warning("sweep %s: %s", name, exc)
            continue
        log.warning("swept instance %s (%s): no live job owns it", inst.id, name)
        with rt.store.session() as s:
            row = s.get(GatewayInstanceRow, name)
            if row is not None and row.status != "terminated":
                row.status, row.ended_at, row.instance_id = "terminated", utcnow(), inst.id
                if row.cost is None:
                    row.cost = instance_cost(
                        row.price_per_hour, rt.cloud.billing_increment_s, row.launched_at, utcnow()
                    )
        done.append(name)
    _never_came(rt, {i.name for i in labelled if i.status != "terminated"})
    return done


def _never_came(rt: Runtime, listed: set[str | None]) -> None:
    """Launches given up without an answer (`book.ABANDONED`) that the cloud still does not
    list `boot_timeout_s` after they were tried never came: they stop counting against the
    caps. (One that shows is terminated above, its cost booked.)"""
    horizon = utcnow() - timedelta(seconds=rt.cfg.boot_timeout_s)
    with rt.store.session() as s:
        rows = s.scalars(
            select(GatewayInstanceRow).where(GatewayInstanceRow.status == book.ABANDONED)
        )
        for row in rows:
            if row.name not in listed and (row.launched_at is None or row.launched_at < horizon):
                row.status = "failed"


def spent_elsewhere(rt: Runtime, nonce: str, found: Settlement) -> None:
    """The buyer's nonce moved money, but not this payment's to us: it can never settle to us
    now, so the payment is dropped (its job never runs, nothing is booked)."""
    log.warning(
        "payment %s: its nonce was used by another transfer (%s to %s, tx %s); dropped",
        nonce[:12],
        found.amount,
        found.pay_to,
        found.transaction,
    )
    with rt.store.session() as s:
        book.unsettled(s, nonce)


async def recover_payments(rt: Runtime) -> None:
    """Payments a crash left between settlement and its record: asked of the facilitator;
    settled → booked (the job runs), unused past the authorisation window → dropped."""
    if rt.ledger is None:
        return
    with rt.store.session() as s:
        pending = list(
            s.scalars(select(GatewayPaymentRow).where(GatewayPaymentRow.status == "pending"))
        )
    for payment in pending:
        try:
            found = await rt.ledger.lookup(payment.payer, payment.nonce)
        except SettlementLookupError:
            continue
        if found.used and not paid_to(found, rt.cfg.pay_to, payment.amount):
            spent_elsewhere(rt, payment.nonce, found)
            continue
        with rt.store.session() as s:
            if found.used:
                book.settled(s, payment.nonce, found.transaction, rt.cfg.hour_s, found.amount)
            elif (utcnow() - payment.created_at).total_seconds() > AUTH_WINDOW_S:
                book.unsettled(s, payment.nonce)
