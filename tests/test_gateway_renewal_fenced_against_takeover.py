"""A renewal sold while another gateway takes the store (`storelease.claim`, fenced) is either
counted by that claim or refused: never written into the other gateway's book after the claim
found it free (a pending payment to this gateway's address that the other would settle or drop,
and a job revived on the other's cloud)."""

from __future__ import annotations

import os
import threading
import types
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text

from procure.gateway import sales, storelease
from procure.store import open_store
from procure.store.gateway_tables import GatewayPaymentRow
from procure.store.ledger import LEDGER_LOCK
from stores import POSTGRES_ENV, postgres_database
from test_gateway import wait_for
from test_gateway_two_on_one_store import config, live_job

pytestmark = pytest.mark.postgres


def test_a_renewal_waits_for_a_takeover_in_progress_and_is_refused() -> None:
    """Before the fix: `new_renewal` checked whose the store was without the fence: while
    another gateway's claim (fenced) had found no unfinished business and was taking the store,
    the renewal read the store still its own and wrote its pending payment after the claim."""
    if not os.environ.get(POSTGRES_ENV):
        pytest.skip(f"set {POSTGRES_ENV}: the race is shown with PostgreSQL's locks")
    with postgres_database(migrated=True) as url:
        store = open_store(url)
        engine = create_engine(url)
        a, b = config("gw-a", "0x" + "a" * 40), config("gw-b", "0x" + "b" * 40)
        try:
            storelease.claim(a, store)
            live_job(store, "gw-1", "booting")  # booting: its paid time has not started
            rt: Any = types.SimpleNamespace(store=store, cfg=a)
            quote: Any = types.SimpleNamespace(quote_id="q2", price_per_hour=10**9, hours=1.0)
            auth = {"nonce": "0x02", "from": "0x" + "2" * 40, "value": 1000}
            answer: list[Any] = []
            with engine.connect() as takeover:
                # gw-b's claim, part way: fenced, the book found free, the lease not yet moved.
                takeover.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LEDGER_LOCK})
                renewal = threading.Thread(
                    target=lambda: answer.append(sales.new_renewal(rt, "gw-1", quote, auth, "r"))
                )
                renewal.start()

                def waiting_or_done() -> bool:
                    with engine.connect() as c:
                        waiting = c.scalar(
                            select(func.count())
                            .select_from(text("pg_locks"))
                            .where(text("locktype = 'advisory' AND NOT granted"))
                        )
                    return bool(waiting) or not renewal.is_alive()

                wait_for(waiting_or_done, 30)
                takeover.execute(
                    text("UPDATE gateway_lease SET identity = :i, vendor_id = 'gw-b'"),
                    {"i": storelease.identity(b)},
                )
                takeover.commit()
            renewal.join(30)
            assert answer and answer[0] is not None and answer[0][0] == 503, answer
            with store.session() as s:
                assert s.scalar(select(func.count()).select_from(GatewayPaymentRow)) == 0
        finally:
            engine.dispose()
            store.dispose()
