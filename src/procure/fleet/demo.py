"""`procure fleet demo`: the fleet controller's story in one process on loopback: a burst saturates
the pool, the controller provisions (an operator approves it), the burst ends, idle instances
are terminated, the Slack messages arrive at a local receiver, and the summary ends it.

The mock cloud's clock is manual: each pause between scans moves it one scan interval, and the
controller's clock reads it, so an hour of the fleet's life plays in seconds, the same each run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet import actions
from procure.fleet.context import FleetContext
from procure.fleet.controller import run_controller
from procure.fleet.outbox import deliver_slack, run_outbox
from procure.fleet.policy import PROVISION, TERMINATE
from procure.fleet.settings import FleetSettings
from procure.fleet.slackhook import SlackReceiver, start_slack_receiver
from procure.fleet.summary import summary
from procure.httpbounds import bounded_client
from procure.local import free_port
from procure.models import utcnow
from procure.store import Store, fleet_repo, open_store

API_KEY = "demo-lambda-key"
NODE_TOKEN = "demo-node-token"
SSH_KEY = "demo-key"
SCAN_S = 60.0  # simulated seconds between scans
WALL_PAUSE_S = 0.02  # real seconds between scans: time for the outbox and the nodes to move
MAX_SCANS = 150  # a safety stop: the story takes about 50


@dataclass
class DemoResult:
    provisions: int = 0  # executed
    terminations: int = 0
    approvals: int = 0
    slack: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    scans: int = 0

    @property
    def ok(self) -> bool:
        return self.provisions >= 1 and self.terminations >= 1 and self.approvals >= 1


def demo_settings(webhook: str, node_port: int, audit_log: Path) -> FleetSettings:
    """The seed's rule on a demo's time scale (minutes instead of a quarter or half hour), with
    a confirmation threshold under one instance's price, so a launch waits for approval, and
    a cap of two instances, so the rails show a block too."""
    return FleetSettings(
        _env_file=None,  # type: ignore[call-arg]
        max_instances=2,
        min_instances=0,
        max_hourly_spend=100.0,
        action_cooldown_mins=6,
        confirmation_threshold=1.0,
        confirmation_timeout_mins=5,
        default_instance_type="gpu_1x_a100",
        region="us-east-1",
        ssh_key_names=[SSH_KEY],
        high_gpu_threshold=80,
        low_gpu_threshold=20,
        high_usage_duration_mins=4,
        low_usage_duration_mins=6,
        scan_interval_s=SCAN_S,
        dry_run=False,
        node_port=node_port,
        node_token=NODE_TOKEN,
        node_lease_s=900,
        slack_webhook_url=webhook,
        audit_log=str(audit_log),
        fleet_name="demo",
    )


def demo_workload() -> list[JobSpec]:
    """A burst of five 12-minute jobs at minute 1.5: more than one GPU can take, for half an
    hour; then nothing."""
    return [JobSpec(90.0 + 5 * n, 1, 720.0) for n in range(5)]


def _count(store: Store, action_type: str) -> int:
    with store.session() as s:
        rows = fleet_repo.list_actions(s, status=("executed", "rolled_back"), limit=1000)
        return sum(1 for r in rows if r.action_type == action_type)


def _fleet_line(mock: MockCloud, minute: int) -> str:
    f = mock.figures()
    statuses = ", ".join(f"{n} {k}" for k, n in sorted(f["instances"].items())) or "none"
    return (
        f"minute {minute:>3}: instances {statuses}; GPUs busy {f['gpus_busy']}/"
        f"{f['gpus_total']}; jobs queued {f['queued']}, running {f['running']}, "
        f"done {f['completed']}"
    )


async def _approve_pending(ctx: FleetContext, console: Console) -> int:
    """The operator: approves what waits, through the service function behind
    POST /api/fleet/actions/{id}/approve (the controller carries it out on its next scan)."""
    with ctx.store.session() as s:
        pending = [r.action_id for r in fleet_repo.list_actions(s, status="pending")]
    for action_id in pending:
        actions.decide(ctx.store, action_id, True, "demo-operator", ctx.clock(), slack=True)
        console.print(
            f"[bold]operator[/] approves {action_id} (as the API's approve does)", soft_wrap=True
        )
    return len(pending)


def _done(mock: MockCloud) -> bool:
    f = mock.figures()
    live = sum(n for k, n in f["instances"].items() if k in ("booting", "active", "unhealthy"))
    return live == 0 and f["queued"] == 0 and f["running"] == 0 and f["pending"] == 0


async def _story(
    mock: MockCloud, store: Store, hook: SlackReceiver, workdir: Path, console: Console
) -> DemoResult:
    result = DemoResult()
    # The story's clock starts far enough back that it never passes the wall clock: the outbox
    # (which runs on the wall clock) finds each message due as soon as it is queued.
    start = utcnow() - timedelta(seconds=MAX_SCANS * SCAN_S)
    cfg = demo_settings(hook.url, mock.state.config.node_port, workdir / "fleet-audit.jsonl")
    cloud = LambdaCloud(LambdaSettings(api_key=API_KEY, api_url=mock.url), pacer=unpaced())
    nodes = bounded_client(deadline_s=cfg.node_timeout_s)
    slack = bounded_client(deadline_s=cfg.slack_timeout_s)
    ctx = FleetContext(
        store=store,
        cloud=cloud,
        nodes=nodes,
        cfg=cfg,
        clock=lambda: start + timedelta(seconds=mock.state.clock.now()),
        dry_run=False,
        slack=True,
    )
    # The pool before the controller starts: one instance someone launched by hand.
    await cloud.launch(
        instance_type=cfg.default_instance_type,
        region=cfg.region,
        name="team-pool-1",
        ssh_key_names=[SSH_KEY],
    )
    console.print("[bold]pool[/]: team-pool-1 (gpu_1x_a100, $1.29/h) launched by hand")
    delivery = asyncio.create_task(
        run_outbox(store, slack, hook.url, Path(cfg.audit_log), None, 0.02)
    )
    stop = asyncio.Event()
    last_line = ""

    async def between_scans(interval: float) -> None:
        # A scan interval of the fleet's life: the operator looks, the clock moves, the
        # outbox delivers. The story ends when the burst is done and nothing runs.
        nonlocal last_line
        result.scans += 1
        result.approvals += await _approve_pending(ctx, console)
        mock.state.clock.advance(interval)
        await asyncio.sleep(WALL_PAUSE_S)
        line = _fleet_line(mock, int(mock.state.clock.now() // 60))
        if line.split(":", 1)[1] != last_line.split(":", 1)[-1]:
            console.print(f"[dim]{line}[/]", soft_wrap=True)
        last_line = line
        if _done(mock) or result.scans >= MAX_SCANS:
            stop.set()

    try:
        await run_controller(ctx, interval_s=SCAN_S, stop=stop, sleep=between_scans)
        await _drain(store, slack, hook)
    finally:
        delivery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await delivery
        await cloud.aclose()
        await nodes.aclose()
        await slack.aclose()
    result.provisions = _count(store, PROVISION)
    result.terminations = _count(store, TERMINATE)
    result.slack = hook.texts()
    with store.session() as s:
        result.summary = summary(s, cfg, ctx.clock())
    return result


async def _drain(store: Store, slack: Any, hook: SlackReceiver) -> None:
    """Deliver what the outbox still holds (the loop delivers on its own schedule)."""
    for _ in range(50):
        await deliver_slack(store, slack, hook.url, utcnow() + timedelta(days=1))
        with store.session() as s:
            if not fleet_repo.outbox_counts(s).get("slack_queued"):
                return
        await asyncio.sleep(0.05)


def run_fleet_demo(*, workdir: Path | None = None, console: Console | None = None) -> DemoResult:
    """Play the story; the summary JSON is printed last."""
    console = console or Console()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="procure-")))
        store = open_store(f"sqlite:///{workdir / 'fleet.db'}")
        stack.callback(store.dispose)
        hook = start_slack_receiver(
            lambda text: console.print(f"[magenta]slack ▸[/] {text}", soft_wrap=True)
        )
        stack.callback(hook.stop)
        mock = start_mock_cloud(
            MockCloudConfig(
                api_key=API_KEY,
                speed=0,  # manual: the demo moves it, one scan interval at a time
                boot_s=60,
                node_port=free_port(),
                node_token=NODE_TOKEN,
                workload=demo_workload(),
            )
        )
        stack.callback(mock.stop)
        console.print(
            f"mock Lambda Cloud on {mock.url}; Slack receiver on {hook.url}; store in {workdir}",
            soft_wrap=True,
        )
        result = asyncio.run(_story(mock, store, hook, workdir, console))
    console.print(
        f"[bold]{result.scans} scans[/]: {result.provisions} provision(s) and "
        f"{result.terminations} termination(s) executed, {result.approvals} approval(s), "
        f"{len(result.slack)} Slack message(s)",
        soft_wrap=True,
    )
    console.print_json(json.dumps(result.summary))
    return result
