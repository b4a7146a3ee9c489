"""The global spend ledger, the agent's side: with a cap on total spend per hour that the next
payment would break, the run waits (saying why once) and pays nothing; once the cap allows it,
the run goes on. Fleet instance-hours count against the same caps (tests/test_fleet_*)."""

from __future__ import annotations

import asyncio

from procure.agent.runtime import close_deps
from procure.agent.tick import tick
from procure.store.ledger import SpendCaps
from world import World, drive, state_of


def test_a_run_waits_while_the_global_cap_would_be_broken(world: World) -> None:
    run_id = world.new_run(budget=5.0)

    async def ticks(n: int) -> list[str]:
        deps = world.deps()
        deps.spend_caps = SpendCaps(per_hour=1_000_000)  # $1/h; vendor 1 asks $1.40
        try:
            return [(await tick(deps, run_id)).message for _ in range(n)]
        finally:
            await close_deps(deps)

    assert asyncio.run(ticks(1)) == ["Waiting for the global spend cap"]
    kept = len(state_of(world, run_id).observations)
    assert asyncio.run(ticks(3)) == ["Waiting for the global spend cap"] * 3
    state = state_of(world, run_id)
    assert len(state.observations) == kept  # waiting adds nothing to the store
    assert state.payments == [] and state.jobs == []
    notes = [o.content for o in state.observations if "global spend cap" in o.content]
    assert len(notes) == 1, notes  # said once, not on every tick
    assert "global spend cap per hour ($1.00) would be exceeded" in notes[0]
    assert state.run.troubles == 0  # waiting on a rolling window is not trouble

    deps = world.deps()
    deps.spend_caps = SpendCaps(per_hour=100_000_000, per_day=100_000_000)
    asyncio.run(drive(deps, run_id))
    assert state_of(world, run_id).run.status == "completed"


def test_the_cap_counts_what_other_runs_already_spent(world: World) -> None:
    first = world.new_run(budget=5.0)
    asyncio.run(drive(world.deps(), first))
    spent = sum(p.amount for p in state_of(world, first).payments if p.status != "failed")
    second = world.new_run(budget=5.0)

    async def once() -> str:
        deps = world.deps()
        deps.spend_caps = SpendCaps(per_day=spent + 1_000_000)  # room for $1 more, not $1.40
        try:
            return (await tick(deps, second)).message
        finally:
            await close_deps(deps)

    assert asyncio.run(once()) == "Waiting for the global spend cap"
    assert state_of(world, second).payments == []
