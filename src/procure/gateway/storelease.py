"""One gateway per store: the store's gateway book (quotes, jobs, payments, instances) carries no
vendor id, and a gateway's loop advances every job in it, so a second gateway on the same store
(another --vendor-id, cloud or wallet) would launch the first's jobs on its own cloud, and drop
the first's payments as spent elsewhere (paid to the first's address, not its own).

The store records whose book it is (`GatewayLeaseRow`: the gateway's vendor id, cloud and
wallet) and whether that gateway runs (a lease its processes renew every third of
`store_lease_s`). Another gateway starting on the store is refused while that lease is held,
and after it lapsed (the gateway stopped or was killed) while the book still holds that
gateway's unfinished business: live jobs, payments being settled, instances it holds. Only that
gateway can finish those (paid to its address, on its cloud): it is started again, or the new
one gets its own store. Processes of one gateway share its store as before."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from procure.gateway import book
from procure.gateway.runtime import Runtime
from procure.gateway.settings import GatewayConfig
from procure.store import Store
from procure.store.gateway_tables import (
    GatewayInstanceRow,
    GatewayJobRow,
    GatewayLeaseRow,
    GatewayPaymentRow,
)
from procure.store.leases import store_now
from procure.store.ledger import fence

log = logging.getLogger(__name__)
NAME = "gateway"


class GatewayConflict(Exception):
    """Another gateway's book is on this store, and it runs or has business left unfinished:
    this gateway refuses to start (or, having lost the store, to act) beside it."""


def identity(cfg: GatewayConfig) -> str:
    """A gateway as the store knows it: its vendor id, its cloud and the wallet it is paid to
    (another PROCURE_HOME is another wallet: payments to one are not the other's)."""
    text = f"{cfg.vendor_id}\x00{cfg.provider}\x00{cfg.pay_to.lower()}"
    return hashlib.sha256(text.encode()).hexdigest()


def _process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


def unfinished(s: Session) -> tuple[int, int, int]:
    """What the book holds that only its gateway can finish: live jobs, payments being settled
    (to its address), instances it may still hold (on its cloud)."""
    jobs = s.scalar(select(func.count()).where(GatewayJobRow.status.in_(book.LIVE)))
    payments = s.scalar(select(func.count()).where(GatewayPaymentRow.status == "pending"))
    instances = s.scalar(select(func.count()).where(GatewayInstanceRow.status.in_(book.COUNTED)))
    return int(jobs or 0), int(payments or 0), int(instances or 0)


def _who(row: GatewayLeaseRow) -> str:
    return f"gateway {row.vendor_id!r} ({row.provider}, paid to {row.pay_to})"


def _running(cfg: GatewayConfig, row: GatewayLeaseRow, until: datetime) -> str:
    return (
        f"gateway {cfg.vendor_id!r} ({cfg.provider}, paid to {cfg.pay_to}) refused: "
        f"{_who(row)} runs on this store (process {row.owner}, its lease held until "
        f"{until:%Y-%m-%d %H:%M:%S} UTC). One store keeps one gateway's book: a second gateway "
        "on it would launch the other's jobs on its own cloud and drop the payments made to the "
        f"other's address. Give gateway {cfg.vendor_id!r} its own store (its own "
        "PROCURE_DATABASE_URL), or stop the other first (one killed without stopping holds the "
        "store until its lease expires)"
    )


def _left(cfg: GatewayConfig, row: GatewayLeaseRow, left: tuple[int, int, int]) -> str:
    jobs, payments, instances = left
    return (
        f"gateway {cfg.vendor_id!r} ({cfg.provider}, paid to {cfg.pay_to}) refused: this "
        f"store's book is {_who(row)}'s, which is stopped with {jobs} live job(s), {payments} "
        f"payment(s) being settled and {instances} instance(s) held: only it can finish them "
        "(paid to its address, run on its cloud). Start that gateway again (the same "
        "--vendor-id, --cloud and PROCURE_HOME) until they end, or give gateway "
        f"{cfg.vendor_id!r} its own store (its own PROCURE_DATABASE_URL)"
    )


def claim(cfg: GatewayConfig, store: Store) -> None:
    """Take (or renew) the store for this gateway as it starts; GatewayConflict while another
    gateway runs on it, or has business left in its book."""
    mine = identity(cfg)
    with store.session() as s:
        # Serialised with the sales (`sales.new_job` fences too): a job sold by the store's
        # gateway as another takes the store is either counted here or refused there.
        fence(s)
        now = store_now(s)
        row = s.get(GatewayLeaseRow, NAME)
        if row is not None and row.identity != mine:
            if row.expires_at is not None and row.expires_at >= now:
                raise GatewayConflict(_running(cfg, row, row.expires_at))
            left = unfinished(s)
            if any(left):
                raise GatewayConflict(_left(cfg, row, left))
            log.warning("gateway %r takes this store over from %s", cfg.vendor_id, _who(row))
        if row is None:
            row = GatewayLeaseRow(name=NAME, taken_at=now)
            s.add(row)
        if row.identity != mine:
            row.identity, row.taken_at = mine, now
            row.vendor_id, row.provider, row.pay_to = cfg.vendor_id[:200], cfg.provider, cfg.pay_to
        row.owner, row.expires_at = _process(), now + timedelta(seconds=cfg.store_lease_s)


def renew(cfg: GatewayConfig, store: Store) -> bool:
    """The heartbeat: whether this gateway still holds the store (its lease renewed; taken
    again if it had lapsed and nothing of another's is left)."""
    with store.session() as s:
        now = store_now(s)
        result = s.execute(
            update(GatewayLeaseRow)
            .where(GatewayLeaseRow.name == NAME, GatewayLeaseRow.identity == identity(cfg))
            .values(owner=_process(), expires_at=now + timedelta(seconds=cfg.store_lease_s))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return True
    try:
        claim(cfg, store)
    except GatewayConflict as exc:
        log.error("this gateway lost its store and acts on nothing: %s", exc)
        return False
    return True


def release(cfg: GatewayConfig, store: Store) -> None:
    """A clean stop: the lease goes (if this process renewed it last: another of the same
    gateway renews it within a third of it), the book stays this gateway's."""
    with store.session() as s:
        s.execute(
            update(GatewayLeaseRow)
            .where(
                GatewayLeaseRow.name == NAME,
                GatewayLeaseRow.identity == identity(cfg),
                GatewayLeaseRow.owner == _process(),
            )
            .values(expires_at=None)
            .execution_options(synchronize_session=False)
        )


def ours(s: Session, cfg: GatewayConfig) -> bool:
    """In a sale's transaction (fenced): whether the store's book is still this gateway's."""
    row = s.get(GatewayLeaseRow, NAME)
    return row is None or row.identity == identity(cfg)


async def heartbeat(rt: Runtime, stop: asyncio.Event) -> None:
    """Renew the store's lease every third of it while the gateway runs; `rt.holds_store`
    says whether it still holds the store (its loop and sales act only while it does)."""
    every = rt.cfg.store_lease_s / 3
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return
        except TimeoutError:
            pass
        try:
            rt.holds_store = renew(rt.cfg, rt.store)
        except Exception as exc:  # the store's trouble: tried again; the loop meets it too
            log.warning("renewing the gateway's store lease failed: %s", exc)
