"""`procure demo --serve`: after the demo's story, its facilitator and mock vendors stay up and
the dashboard (with a worker, so runs started from it advance) serves its store until Ctrl+C.

So that the Fleet and Nodes pages have something to show, a mock Lambda Cloud starts too, with
two instances launched by hand, each running a real GPU node over a simulated NVML (one busy
with a long training job, one idle), and the fleet controller runs inside the server in dry run:
it samples the nodes, flags the idle one and records what it would do, never calling the cloud
to launch or terminate anything. None of this runs in the plain `procure demo`.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

from rich.console import Console

from procure.agent.worker import WorkerConfig
from procure.api.app import create_app
from procure.clouds.lambda_cloud.client import LambdaCloud
from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.inprocess import FleetRun
from procure.fleet.settings import FleetSettings
from procure.local import free_port, serve
from procure.models import utcnow
from procure.settings import Settings
from procure.store import Store, fleet_repo

CLOUD_KEY = "demo-lambda-key"
NODE_TOKEN = "demo-node-token"
SSH_KEY = "demo-key"
INSTANCE_TYPE = "gpu_1x_a100"
REGION = "us-east-1"
NODES = ("demo-gpu-1", "demo-gpu-2")
SCAN_S = 2.0  # the controller's scan interval in the demo (real seconds)
READY_S = 20.0  # how long to wait for the nodes to boot and the first scan to sample them


def demo_cloud() -> MockCloud:
    """The mock cloud on real time, with the demo's two instances active and their nodes up:
    one long training job keeps one GPU busy, the other stays idle."""
    week = 7 * 24 * 3600.0
    mock = start_mock_cloud(
        MockCloudConfig(
            api_key=CLOUD_KEY,
            speed=1.0,
            boot_s=1.0,
            node_port=free_port(),
            node_token=NODE_TOKEN,
            workload=[JobSpec(submit_s=0.0, gpus=1, duration_s=week)],
        )
    )
    try:
        asyncio.run(_launch(mock))
        deadline = time.monotonic() + READY_S
        while not _all_up(mock) and time.monotonic() < deadline:
            time.sleep(0.1)
    except BaseException:
        mock.stop()
        raise
    return mock


async def _launch(mock: MockCloud) -> None:
    cloud = LambdaCloud(LambdaSettings(api_key=CLOUD_KEY, api_url=mock.url), pacer=unpaced())
    try:
        for name in NODES:  # as an operator would, by hand: the controller did not launch them
            await cloud.launch(
                instance_type=INSTANCE_TYPE, region=REGION, name=name, ssh_key_names=[SSH_KEY]
            )
    finally:
        await cloud.aclose()


def _all_up(mock: MockCloud) -> bool:
    """Both instances active with their nodes bound, and the training job placed on one."""
    with mock.state.lock:
        live = list(mock.state.instances.values())
        up = len(live) == len(NODES) and all(i.status == "active" and i.ip for i in live)
    return up and mock.figures()["running"] >= 1


def demo_fleet(mock: MockCloud, workdir: Path) -> FleetRun:
    """The in-server controller over the demo cloud: dry run, a scan every two seconds, and the
    seed's windows shortened to a minute and a half, so that the idle node is flagged (and its
    termination rehearsed) soon after the dashboard opens. Every setting is given, so a
    developer's environment (a Slack webhook, Prometheus) stays out."""
    cfg = FleetSettings(
        _env_file=None,  # type: ignore[call-arg]
        dry_run=True,
        max_instances=4,
        min_instances=0,
        max_hourly_spend=20.0,
        action_cooldown_mins=10,
        confirmation_threshold=1.0,
        default_instance_type=INSTANCE_TYPE,
        region=REGION,
        ssh_key_names=[SSH_KEY],
        high_usage_duration_mins=1.5,
        low_usage_duration_mins=1.5,
        scan_interval_s=SCAN_S,
        node_port=mock.state.config.node_port,
        node_token=NODE_TOKEN,
        prometheus_url=None,
        slack_webhook_url=None,
        audit_log=str(workdir / "fleet-audit.jsonl"),
        audit_git=None,
        fleet_name="demo",
    )
    cloud = LambdaSettings(api_key=CLOUD_KEY, api_url=mock.url)
    return FleetRun(cfg=cfg, cloud=cloud, pacer=unpaced())


def _wait_for_a_scan(store: Store) -> None:
    """Until the controller has sampled every demo node (or READY_S passes)."""
    started = utcnow()
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        with store.session() as s:
            live = [r.instance_id for r in fleet_repo.live_instances(s)]
            sampled = {r.instance_id for r in fleet_repo.samples_since(s, live, started)}
        if len(live) == len(NODES) and sampled == set(live):
            return
        time.sleep(0.1)


def serve_until_interrupted(
    settings: Settings, store: Store, *, port: int, console: Console
) -> None:
    """Serve on 127.0.0.1:`port`; return on Ctrl+C (SIGINT) once the server has stopped."""
    if threading.current_thread() is threading.main_thread():
        # A shell starting it in the background (`&`, no job control) hands it SIGINT ignored,
        # which Python keeps: `kill -INT` must stop it all the same.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        mock = demo_cloud()
    except KeyboardInterrupt:
        console.print("stopping")
        return
    try:
        fleet = demo_fleet(mock, settings.home)
        app = create_app(settings, store, worker=WorkerConfig(poll_interval_s=0.5), fleet=fleet)
        server = serve(app, port)
        try:
            _wait_for_a_scan(store)
            console.rule("dashboard")
            console.print(
                f"mock Lambda Cloud {mock.url}: {len(NODES)} instances with simulated GPU nodes; "
                f"the fleet controller scans them every {SCAN_S:g} s in dry run",
                soft_wrap=True,
            )
            # Printed once the server accepts connections: scripts may wait for this line.
            console.print(f"dashboard {server.url}/ (Ctrl+C to stop)", soft_wrap=True)
            console.file.flush()
            while server.thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            server.stop()
    finally:
        mock.stop()
