"""An API or CLI tick whose lease is lost (its loop stalled past the TTL and a worker took the run)
stops at once instead of ticking on beside the new holder (invariant 4)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import update

from procure.agent import leased_tick
from procure.agent.deps import TickResult
from procure.agent.leased_tick import LeaseHeld, tick_under_lease
from procure.models import JobSpec, utcnow
from procure.store import open_store, repo
from procure.store.tables import RunRow


def test_a_lost_lease_stops_the_tick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=1_000_000, job_spec=JobSpec()
        ).id
    stopped = asyncio.Event()

    async def slow_tick(_deps: object, _run_id: str) -> TickResult:
        with store.session() as s:  # meanwhile a worker takes the run over, for a minute
            # (its own TTL: were it left at ours, a busy machine could see it lapse before the
            # test looks, and the run would look free rather than held by worker-b)
            until = utcnow() + timedelta(seconds=60)
            s.execute(update(RunRow).values(lease_owner="worker-b", lease_expires_at=until))
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return TickResult("ticked on beside the new holder")

    monkeypatch.setattr(leased_tick, "tick", slow_tick)
    deps = SimpleNamespace(store=store)
    with pytest.raises(LeaseHeld) as held:
        asyncio.run(tick_under_lease(deps, run_id, "api-a", lease_s=0.3))  # type: ignore[arg-type]
    assert held.value.holder == "worker-b"
    assert stopped.is_set()
    with store.session() as s:  # the new holder keeps its lease
        assert repo.get_run(s, run_id) is not None
        from procure.store import leases

        assert leases.holder(s, run_id) == "worker-b"
    store.dispose()
