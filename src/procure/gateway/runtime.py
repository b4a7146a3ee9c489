"""The gateway's runtime (its config, store, cloud, ledger and node client) and the book's
one-transaction reads and writes that the loop's steps share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from procure.clouds.base import RentalCloud
from procure.gateway import book
from procure.gateway.settings import GatewayConfig
from procure.gpu.jobclient import NodeJobClient
from procure.models import utcnow
from procure.payments.settlements import FacilitatorLedger
from procure.safetext import redact, remember_secret
from procure.store import Store
from procure.store.gateway_tables import GatewayInstanceRow, GatewayJobRow

KEPT = "kept while a renewal's payment is being settled"


NodeFactory = Callable[[str, str, str], NodeJobClient]


def http_node(url: str, token: str, host: str) -> NodeJobClient:
    remember_secret(token)  # a node (or cloud) that echoes it must not have it shown to buyers
    return NodeJobClient(url, token, expected_host=host, deadline_s=10.0)


@dataclass
class Runtime:
    cfg: GatewayConfig
    store: Store
    cloud: RentalCloud
    ledger: FacilitatorLedger | None = None  # reconciles payments a crash left pending
    node: NodeFactory = http_node
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Whether the store's book is still this gateway's (`storelease.heartbeat`): once another
    # gateway took it, this one advances and sells nothing.
    holds_store: bool = True


# --- the book, one short transaction at a time ------------------------------------------------


def job_row(rt: Runtime, job_id: str) -> GatewayJobRow | None:
    with rt.store.session() as s:
        return book.job(s, job_id)


def instance_row(rt: Runtime, job_id: str) -> GatewayInstanceRow | None:
    with rt.store.session() as s:
        rows = book.instances_of(s, job_id)
    return rows[-1] if rows else None


def update_job(rt: Runtime, job_id: str, say: str | None = None, **fields: Any) -> None:
    with rt.store.session() as s:
        row = s.get(GatewayJobRow, job_id)
        if row is None:
            return
        for name, value in fields.items():
            # A job's error and notes quote clouds and nodes, and a buyer reads them.
            setattr(row, name, redact(value) if name == "error" and value else value)
        if say:
            book.note(row, f"[gateway] {redact(say)}", rt.cfg.log_lines)
        row.updated_at = utcnow()


def update_instance(rt: Runtime, name: str, **fields: Any) -> None:
    with rt.store.session() as s:
        row = s.get(GatewayInstanceRow, name)
        if row is not None:
            for key, value in fields.items():
                setattr(row, key, value)


def mark_running(
    rt: Runtime, job_id: str, say: str, now: datetime, inst: str, node_url: str, node_job: str
) -> None:
    """The job runs on the instance named `inst` (its node's job `node_job`): its paid time, if
    it had not started yet, counts from `now`; if it had (a lost instance replaced, a job
    revived), it is moved on by this instance's boot, which is the gateway's, as a first boot
    is. From the rows as they are now (locked: a renewal booked while the node was being asked
    is kept), the instance's own `booting` → `running` in the same transaction (so a boot is
    given back once)."""
    with rt.store.session() as s:
        row = s.get(GatewayJobRow, job_id, with_for_update=True)
        instance = s.get(GatewayInstanceRow, inst, with_for_update=True)
        if row is None or instance is None:
            return
        if row.paid_until is None:
            row.paid_until = now + timedelta(seconds=row.paid_hours * rt.cfg.hour_s)
        elif instance.status == "booting" and instance.launched_at is not None:
            row.paid_until = row.paid_until + max(timedelta(0), now - instance.launched_at)
        instance.status, instance.node_url, instance.node_job_id = "running", node_url, node_job
        row.status, row.log_cursor = "running", 0
        book.note(row, f"[gateway] {say}", rt.cfg.log_lines)
        row.updated_at = utcnow()


def paid_end(rt: Runtime, row: GatewayJobRow) -> datetime:
    """When the paid time ends: set once the job first runs; before that, the paid hours from
    payment bound the attempts to launch."""
    if row.paid_until is not None:
        return row.paid_until
    return row.created_at + timedelta(seconds=row.paid_hours * rt.cfg.hour_s)


def kept_for_renewal(rt: Runtime, row: GatewayJobRow) -> GatewayJobRow | None:
    """The job past its paid time, kept (fresh from the book, its log saying so) while a
    renewal of it is still being settled (a lost settle answer): the buyer may have paid for
    more, so it is not ended until that payment is booked (the time is added) or dropped. At
    most the payment's window and two sweeps (the loop books or drops it by then); None: it
    ends as before."""
    from procure.gateway import loop  # loop.py imports this module

    # The loop books or drops a pending payment once the ledger says (at the latest its first
    # sweep past the window); the hold lasts that long, and no longer if the ledger is down.
    since = utcnow() - timedelta(seconds=loop.AUTH_WINDOW_S + 2 * rt.cfg.sweep_every_s)
    with rt.store.session() as s:
        job = s.get(GatewayJobRow, row.job_id)
        if job is not None and utcnow() <= paid_end(rt, job):
            return job  # a renewal was booked since `row` was read: its time is added
        if job is None:
            return None
        # Only a renewal made while the job was paid for holds it (one made during the hold
        # would let a buyer whose payments never settle chain holds for ever).
        doubt = book.renewal_in_doubt(s, row.job_id, since, paid_end(rt, job))
        if doubt is None:
            return None
        line = (
            f"[gateway] paid time ran out; {KEPT} (payment {doubt.nonce[:10]}: until it is "
            "booked or dropped)"
        )
        if line not in job.logs:  # once per payment, not every poll
            book.note(job, line, rt.cfg.log_lines)
            job.updated_at = utcnow()
        return job


def out_of_time(rt: Runtime, row: GatewayJobRow) -> bool:
    """The paid time ran out and no renewal of it may still be paid: the job ends."""
    return utcnow() > paid_end(rt, row) and kept_for_renewal(rt, row) is None
