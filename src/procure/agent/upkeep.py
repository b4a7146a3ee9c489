"""The worker's upkeep beside its ticks: retention of the tick log (`prune`), settling payments
in doubt on ended runs, and sweeping cloud instances no live run owns, each on its own timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from procure.agent.deps import AgentDeps
from procure.agent.reconcile import settle_ended_runs
from procure.store import Store, leases, totals

if TYPE_CHECKING:
    from procure.agent.worker import WorkerConfig

log = logging.getLogger("procure.agent.worker")  # the worker's log, as before the split

TRIM_LOOKBACK = 100_000
"""On its first pass a worker trims the runs of the newest this many tick log rows (older
rows go by age)."""


def prune(store: Store, cfg: WorkerConfig, mark: int | None = None) -> tuple[int, int]:
    """Retention of operational logs: the tick log's rows past `cfg.tick_log_days`, then each
    recently ticked run's rows beyond its newest `cfg.tick_log_per_run`, in transactions of at
    most `cfg.prune_batch` rows, repeated until a batch comes back short (caught up) or
    `cfg.prune_budget_s` passes (one batch of each at least, even with no budget left); the
    store's running totals are folded too. Returns (rows deleted, the trim mark for next
    time; None starts near the newest rows)."""
    deadline = time.monotonic() + cfg.prune_budget_s
    deleted = 0
    with store.session() as s:
        totals.fold(s)
        if mark is None:
            mark = max(0, leases.tick_log_mark(s) - TRIM_LOOKBACK)
    # Each step does one batch at least, whatever is left of the budget: a caller whose other
    # work ate it (the serverless cron's ticks, cut at their deadline) still makes headway,
    # else a busy store's log would never be pruned at all.
    while True:
        with store.session() as s:
            n = leases.prune_tick_log(
                s, older_than_s=cfg.tick_log_days * 86400, limit=cfg.prune_batch
            )
        deleted += n
        if n < cfg.prune_batch or time.monotonic() >= deadline:
            break
    while True:
        with store.session() as s:
            n, next_mark = leases.trim_tick_log_runs(
                s, keep=max(1, cfg.tick_log_per_run), since_id=mark
            )
        deleted += n
        caught_up = next_mark == mark
        mark = next_mark
        if caught_up or time.monotonic() >= deadline:
            break
    return deleted, mark


async def settle_and_prune(deps: AgentDeps, every_s: float, prune_pass: Callable[[], int]) -> None:
    """Payments in doubt on runs that have ended: nobody ticks those runs, so settle them
    here once the ledger knows (see `reconcile.settle_ended_runs`). The tick log is pruned here
    too (`prune_pass`, in a thread), a bounded chunk at a time. Runs until cancelled."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await settle_ended_runs(deps)
        except Exception:
            log.exception("settling payments of ended runs failed")
        try:
            await asyncio.to_thread(prune_pass)
        except Exception:
            log.exception("pruning the tick log failed")


async def sweep_clouds(deps: AgentDeps) -> None:
    """The agent's cloud instances that no live run owns are terminated (`cloud_sweeper`).
    Runs until cancelled; returns at once when the agent has no cloud."""
    from procure.agent.cloud_sweeper import sweep

    while deps.clouds:
        await asyncio.sleep(deps.cloud.sweep_every_s)
        try:
            await sweep(deps)
        except Exception:
            log.exception("sweeping cloud instances failed")
