"""The kept instances' announcements a fleet scan looks up (`fleet.kept._announced`: the audit
entries of the last 7 days) are read by an index on the outbox's channel and age, on both stores,
so a busy week's outbox costs the scan no more than a quiet one."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from procure.fleet import kept
from procure.models import utcnow
from procure.store import Store, fleet_repo, open_store
from test_scale_plans import full_scans, plans


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


def test_the_announcements_are_read_by_channel_and_age(store: Store) -> None:
    """Before the fix: the outbox had no index on its age; the scan's read of 7 days of audit
    entries found them by `ix_fleet_outbox_due` on the channel alone, every audit entry the
    outbox holds (both stores' plans said so)."""
    now = utcnow()
    entry = {"timestamp": "t", "kept": {"instance": "i-1"}}
    with store.session() as s:
        fleet_repo.enqueue(s, "audit", entry, now - timedelta(days=1))
        fleet_repo.enqueue(
            s, "audit", entry | {"kept": {"instance": "i-2"}}, now - timedelta(days=9)
        )
        fleet_repo.enqueue(s, "slack", {"text": "hi"}, now)
    with store.session() as s:  # what it answers stays what it was
        assert kept._announced(s, ["i-1", "i-2", "i-3"], now - kept.REMIND_AFTER) == {"i-1"}

    found = plans(
        store, lambda s: kept._announced(s, ["i-1"], now - kept.REMIND_AFTER), sorted_=False
    )
    [(_sql, plan)] = [(sql, plan) for sql, plan in found if "fleet_outbox" in sql]
    assert "ix_fleet_outbox_channel_created" in plan, plan
    assert not full_scans(plan, "fleet_outbox", store.is_sqlite), plan
