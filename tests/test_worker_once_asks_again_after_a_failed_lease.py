"""`procure worker --once` whose leasing of due runs raises (a store busy or restarting) asks
again after its pause instead of ending, exit 0, having ticked nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from procure.agent.runtime import close_deps
from procure.agent.worker import ONCE_LEASE_TRIES, Worker, WorkerConfig
from procure.store import leases
from world import World


def _once(world: World, monkeypatch: pytest.MonkeyPatch, failures: int) -> int:
    real = leases.acquire_due
    raised = []

    def flaky(*args: Any, **kwargs: Any) -> list[str]:
        if len(raised) < failures:
            raised.append(1)
            raise RuntimeError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(leases, "acquire_due", flaky)

    async def go() -> int:
        deps = world.deps()
        try:
            cfg = WorkerConfig(concurrency=2, once=True, poll_interval_s=0, idle_min_s=0.05)
            return (await Worker(deps, cfg).run()).ticks
        finally:
            await close_deps(deps)

    return asyncio.run(go())


def test_a_once_worker_whose_lease_failed_ticks_the_due_run(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: the first leasing attempt raised, and `--once` stopped there, its run
    never ticked (seen once in a full suite: a worker's run with no job and no observation)."""
    world.new_run()
    assert _once(world, monkeypatch, failures=2) == 1


def test_a_once_worker_gives_up_after_its_tries(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that keeps failing is not asked for ever."""
    world.new_run()
    assert _once(world, monkeypatch, failures=ONCE_LEASE_TRIES + 10) == 0
