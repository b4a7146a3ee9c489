"""The fleet controller inside `procure serve --fleet`, like the agent's worker: started with the
app, its outbox delivered beside it, stopped on shutdown with its fleet lease released. Each
task's state is kept in `health` (shown by /healthz): one that dies says so, in the log too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.pacing import Pacer
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.fleet.context import FleetContext
from procure.fleet.controller import run_controller
from procure.fleet.outbox import run_outbox
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.safetext import show_url
from procure.store import Store
from procure.store.ledger import SpendCaps

log = logging.getLogger(__name__)
STOP_TIMEOUT_S = 15.0  # a scan in flight may be waiting on the cloud: give it this long


@dataclass(frozen=True)
class FleetRun:
    """How the in-server controller runs: its settings (dry run unless LAMBDA_LABS_DRY_RUN is
    false), the cloud's, the global caps; `pacer` and `interval_s` for tests."""

    cfg: FleetSettings
    cloud: LambdaSettings
    caps: SpendCaps = field(default_factory=SpendCaps)
    pacer: Pacer | None = None
    interval_s: float | None = None


def _watch(task: asyncio.Task[object], name: str, health: dict[str, str]) -> None:
    """When `task` ends, its state in `health`; an exception is logged, never lost."""

    def done(finished: asyncio.Task[object]) -> None:
        if finished.cancelled():
            health[name] = "stopped"
            return
        exc = finished.exception()
        if exc is None:
            health[name] = "stopped"
            return
        health[name] = f"failed: {type(exc).__name__}"
        log.error("background task %s failed; it no longer runs", name, exc_info=exc)

    task.add_done_callback(done)


@contextlib.asynccontextmanager
async def fleet_in_server(
    store: Store, run: FleetRun, health: dict[str, str] | None = None
) -> AsyncIterator[FleetContext]:
    health = health if health is not None else {}
    cfg = run.cfg
    webhook = cfg.slack_webhook_url.get_secret_value() if cfg.slack_webhook_url else None
    cloud = LambdaCloud(run.cloud, pacer=run.pacer)
    nodes = bounded_client(deadline_s=cfg.node_timeout_s)
    slack = bounded_client(deadline_s=cfg.slack_timeout_s) if webhook else None
    ctx = FleetContext(
        store=store,
        cloud=cloud,
        nodes=nodes,
        cfg=cfg,
        caps=run.caps,
        dry_run=cfg.dry_run,
        slack=webhook is not None,
    )
    stop = asyncio.Event()
    health["fleet-controller"] = "starting"
    controller = asyncio.create_task(
        run_controller(ctx, interval_s=run.interval_s, stop=stop, health=health),
        name="procure-fleet",
    )
    _watch(controller, "fleet-controller", health)
    git_dir = Path(cfg.audit_git) if cfg.audit_git else None
    delivery = asyncio.create_task(
        run_outbox(store, slack, webhook, Path(cfg.audit_log), git_dir),
        name="procure-fleet-outbox",
    )
    health["fleet-outbox"] = "running"
    _watch(delivery, "fleet-outbox", health)
    mode = "dry run" if cfg.dry_run else "LIVE"
    log.info("fleet controller %s (%s) on %s", ctx.owner, mode, show_url(run.cloud.api_url))
    try:
        yield ctx
    finally:
        stop.set()
        try:
            # run_controller releases the fleet lease on its way out, even when cancelled.
            await asyncio.wait_for(controller, STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("the fleet controller did not stop in time; cancelled")
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        await cloud.aclose()
        await nodes.aclose()
        if slack is not None:
            await slack.aclose()
