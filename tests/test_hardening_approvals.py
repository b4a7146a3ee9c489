"""The fleet's approval rail under real concurrent HTTP requests, on SQLite and PostgreSQL:
approve and reject of one action end in exactly one outcome (the one answered 200), a rejected
action never launches, an expired approval cannot be approved, and the fleet page shows the
true number of pending approvals."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from fleet_fakes import PRICE, FakeCloud
from fleet_world import all_actions, fleet, scan_for
from procure.api.app import create_app
from procure.fleet.policy import PROVISION
from procure.local import serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import Store, fleet_repo, open_store
from procure.store.fleet_tables import FleetLeaseRow

TOKEN = "api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[tuple[str, str]]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, PROCURE_API_TOKEN=TOKEN)
    store = open_store(db_url)
    server = serve(create_app(settings, store))
    yield server.url, db_url
    server.stop()
    store.dispose()


def add_pending(store: Store, n: int, *, expires_in: timedelta = timedelta(hours=1)) -> list[str]:
    now = utcnow()
    ids = [f"provision_race_{i:03d}" for i in range(n)]
    with store.session() as s:
        for i, action_id in enumerate(ids):
            fleet_repo.add_action(
                s,
                action_id=action_id,
                action_type=PROVISION,
                target_instance=None,
                reason="test: needs approval",
                cost_impact=Decimal("1.29"),
                status="pending",
                created_at=now - timedelta(seconds=n - i),
                dry_run=False,
                instance_type="gpu_1x_a100",
                region="us-east-1",
                price_per_hour=PRICE,
                needed_approval=True,
                expires_at=now + expires_in,
            )
    return ids


def test_concurrent_approve_and_reject_end_in_the_winner(api: tuple[str, str]) -> None:
    url, db_url = api

    async def body() -> None:
        cloud = FakeCloud()
        async with fleet(db_url, cloud, max_instances=100, max_hourly_spend=1000.0) as ctx:
            ctx.clock.now = utcnow()  # type: ignore[attr-defined]
            ids = add_pending(ctx.store, 16)
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:

                async def send(action_id: str, verb: str) -> tuple[str, str, int]:
                    answer = await http.post(f"/api/fleet/actions/{action_id}/{verb}", headers=AUTH)
                    return action_id, verb, answer.status_code

                # Every pair at once, approve first for half of them and reject first for the rest.
                sends = []
                for i, action_id in enumerate(ids):
                    verbs = ("approve", "reject") if i % 2 else ("reject", "approve")
                    sends += [send(action_id, v) for v in verbs]
                answers = await asyncio.gather(*sends)
            winners: dict[str, str] = {}
            for action_id in ids:
                codes = {verb: code for a, verb, code in answers if a == action_id}
                assert sorted(codes.values()) == [200, 409], (action_id, codes)
                winners[action_id] = next(v for v, c in codes.items() if c == 200)
            statuses = {a.action_id: a.status for a in all_actions(ctx)}
            expected = {"approve": "approved", "reject": "rejected"}
            assert statuses == {a: expected[w] for a, w in winners.items()}

            await scan_for(ctx, 1)  # the controller carries out what was approved
            approved = {a for a, w in winners.items() if w == "approve"}
            assert set(cloud.launches) == approved
            final = {a.action_id: a.status for a in all_actions(ctx)}
            assert all(final[a] == "rejected" for a in ids if a not in approved)

    asyncio.run(body())


def test_an_expired_approval_is_not_approvable(api: tuple[str, str]) -> None:
    url, db_url = api

    async def body() -> None:
        cloud = FakeCloud()
        cloud.add(util=95)
        async with fleet(db_url, cloud, confirmation_threshold=1.0) as ctx:
            # The controller on the wall clock: its last scan was 24 minutes ago, so the
            # action it left pending (5 minutes to confirm) expired 19 minutes ago, and the
            # controller has not yet scanned again to expire it itself.
            ctx.clock.now = utcnow() - timedelta(minutes=40)  # type: ignore[attr-defined]
            await scan_for(ctx, 17)
            with ctx.store.session() as s:  # those scans were on the wall clock of their time
                s.execute(update(FleetLeaseRow).values(clock_offset_s=0.0))
            (action,) = all_actions(ctx)
            assert action.status == "pending"
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                answer = await http.post(
                    f"/api/fleet/actions/{action.action_id}/approve", headers=AUTH
                )
                assert answer.status_code == 409
                assert "expired" in answer.json()["error"]
            (after,) = all_actions(ctx)
            assert (after.status, after.decided_by) == ("rejected", "timeout")
            assert after.error_message == "no confirmation within 5 min"
            ctx.clock.now = utcnow()  # type: ignore[attr-defined]
            await scan_for(ctx, 3)
            assert cloud.launches == []

    asyncio.run(body())


def test_fleet_page_counts_every_pending_approval(tmp_path: Path, db_url: str) -> None:
    store = open_store(db_url)
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    server = serve(create_app(settings, store))
    try:
        add_pending(store, 130)  # more than one page of the list
        page = httpx.get(server.url + "/fleet", timeout=30)
        assert page.status_code == 200
        shown = re.search(r"Pending approvals \(<span[^>]*>(\d+)</span>\)", page.text)
        assert shown is not None and shown.group(1) == "130"
    finally:
        server.stop()
        store.dispose()
