"""The fleet's ledger when a launch the cloud paused (kept, as `resumable`, since this session)
runs again: the caps count the hours it ran, not the hours it stood stopped. Real store."""

from __future__ import annotations

from datetime import datetime, timedelta

from procure.models import usd_to_micros, utcnow
from procure.store import fleet_repo, ledger, open_store

DOLLAR_AN_HOUR = usd_to_micros(1)


def _listed(s: object, at: datetime, instance_id: str, status: str) -> None:
    """What `sync_instances` records of one instance in a scan's listing."""
    fleet_repo.upsert_instance(
        s,  # type: ignore[arg-type]
        at,
        instance_id=instance_id,
        name=f"fleet-{instance_id}",
        instance_type="gpu_1x_rtx4090",
        region="us",
        ip=None,
        status=status,
        price_per_hour=DOLLAR_AN_HOUR,
        gpus=1,
        launched_by=None,
    )


def test_a_paused_launch_that_runs_again_counts_only_its_running_hours(db_url: str) -> None:
    """Before the fix: a Vast.ai launch paused for 10 hours (outbid, or its balance run out:
    listed `preempted`, kept since it is `resumable`) that then ran again was revived in the
    ledger as if it had run since it was first seen: its 2 hours of GPU counted as 12 against
    the fleet's caps (a day's cap refused launches the account could pay for)."""
    store = open_store(db_url)
    start = utcnow() - timedelta(hours=12)
    try:
        for hours, status in ((0, "active"), (1, "preempted"), (11, "active")):
            with store.session() as s:  # one scan each: paused by Vast.ai, then it runs again
                _listed(s, start + timedelta(hours=hours), "i-1", status)
        now = start + timedelta(hours=12)
        with store.session() as s:
            spent = ledger.fleet_spent(s, start - timedelta(hours=1), now, forward=False)
        assert spent == 2 * DOLLAR_AN_HOUR
    finally:
        store.dispose()


def test_a_launch_missing_from_listings_still_counts_while_it_was_missing(db_url: str) -> None:
    """A launch left out of the listings (a lagging cloud, ended by the ledger's grace) was
    running all along: listed again, its hours meanwhile still count."""
    store = open_store(db_url)
    start = utcnow() - timedelta(hours=3)
    try:
        with store.session() as s:
            _listed(s, start, "i-2", "active")
        with store.session() as s:
            fleet_repo.end_instances(s, ["i-2"], start + timedelta(hours=1))
        with store.session() as s:
            _listed(s, start + timedelta(hours=2), "i-2", "active")
        now = start + timedelta(hours=3)
        with store.session() as s:
            spent = ledger.fleet_spent(s, start - timedelta(hours=1), now, forward=False)
        assert spent == 3 * DOLLAR_AN_HOUR
    finally:
        store.dispose()
