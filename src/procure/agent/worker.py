"""The worker loop: lease due runs, tick them concurrently (bounded), heartbeat, release, and
back off when there is nothing to do. Several workers may share one PostgreSQL store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from procure.agent.tick import AgentDeps, RunNotFound, tick
from procure.store import leases

log = logging.getLogger(__name__)


@dataclass
class WorkerConfig:
    concurrency: int = 16
    lease_s: float = 60.0
    heartbeat_s: float = 20.0
    poll_interval_s: float = 1.0  # how soon a run is due again after a tick
    idle_min_s: float = 0.05
    idle_max_s: float = 2.0
    owner: str = field(
        default_factory=lambda: (
            f"worker-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
    )


async def _tick_one(deps: AgentDeps, cfg: WorkerConfig, run_id: str) -> str:
    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(cfg.heartbeat_s)
            with deps.store.session() as s:
                leases.renew(s, run_id, cfg.owner, cfg.lease_s)

    beat = asyncio.create_task(heartbeat())
    try:
        result = await tick(deps, run_id)
        return result.message
    except RunNotFound:
        return "Run not found"
    except Exception:  # one run's bug must not stop the others; the lease expires, it is retried
        log.exception("tick of run %s failed", run_id)
        return "Tick error"
    finally:
        beat.cancel()
        with deps.store.session() as s:
            leases.release(s, run_id, cfg.owner, next_tick_in_s=cfg.poll_interval_s)


async def run_once(deps: AgentDeps, cfg: WorkerConfig) -> int:
    """Lease and tick one batch of due runs; return how many were ticked."""
    with deps.store.session() as s:
        run_ids = leases.acquire_due(s, cfg.owner, cfg.lease_s, cfg.concurrency)
    if run_ids:
        await asyncio.gather(*(_tick_one(deps, cfg, r) for r in run_ids))
    return len(run_ids)


async def run_worker(
    deps: AgentDeps,
    cfg: WorkerConfig | None = None,
    *,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Tick due runs until `should_stop()`; sleep with exponential backoff while idle."""
    cfg = cfg or WorkerConfig()
    idle = cfg.idle_min_s
    log.info("worker %s started (concurrency %d)", cfg.owner, cfg.concurrency)
    while not should_stop():
        ticked = await run_once(deps, cfg)
        if ticked:
            idle = cfg.idle_min_s
            continue
        await asyncio.sleep(idle)
        idle = min(cfg.idle_max_s, idle * 2)
