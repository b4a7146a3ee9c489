"""`procure mock-cloud`: the local mock of Lambda Cloud's API, with a simulated GPU node per
instance and an optional workload, on a clock that can run faster than real time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from procure.cli_common import console
from procure.numbers import number, whole
from procure.safetext import safe


def mock_cloud(
    port: Annotated[
        int, typer.Option(help="Port of the API on 127.0.0.1", parser=whole(1, 65535, "--port"))
    ] = 4100,
    speed: Annotated[
        float,
        typer.Option(help="Simulated seconds per real second", parser=number(0, 1e6, "--speed")),
    ] = 1.0,
    boot_s: Annotated[
        float,
        typer.Option(help="Booting → active, simulated s", parser=number(0, 86400, "--boot-s")),
    ] = 180.0,
    node_port: Annotated[
        int,
        typer.Option(
            help="Port of every instance's GPU node", parser=whole(1, 65535, "--node-port")
        ),
    ] = 9876,
    node_token: Annotated[
        str | None,
        typer.Option(help="Nodes' bearer token (leases need one)", envvar="MOCK_CLOUD_NODE_TOKEN"),
    ] = None,
    quota: Annotated[
        int,
        typer.Option(help="Most instances alive at once", parser=whole(0, 10_000, "--quota")),
    ] = 20,
    capacity: Annotated[
        int,
        typer.Option(help="Instances per type and region", parser=whole(0, 10_000, "--capacity")),
    ] = 8,
    workload: Annotated[
        Path | None, typer.Option(help="CSV of jobs: submit_s,gpus,duration_s")
    ] = None,
    synthetic_seed: Annotated[
        int | None,
        typer.Option(
            help="A synthetic day of jobs from this seed",
            parser=whole(0, 2**32 - 1, "--synthetic-seed"),
        ),
    ] = None,
    no_nodes: Annotated[bool, typer.Option("--no-nodes", help="No GPU node per instance")] = False,
) -> None:
    """Serve Lambda Cloud's API v1 on loopback (key: LAMBDA_API_KEY, else mock-lambda-key).
    Each instance gets a GPU node at http://127.0.0.N:NODE_PORT; admin endpoints under /admin
    inject faults, move the clock, add workloads and report the queue (see README)."""
    import uvicorn

    from procure.clouds.lambda_cloud.catalogue import default_capacity
    from procure.clouds.lambda_cloud.mock import create_mock_cloud_app
    from procure.clouds.lambda_cloud.mockstate import MockCloudConfig, MockCloudState
    from procure.sim.workload import WorkloadError, load_csv, synthetic

    jobs = []
    try:
        if workload is not None:
            jobs = load_csv(workload)
        elif synthetic_seed is not None:
            jobs = synthetic(synthetic_seed)
    except (OSError, WorkloadError) as exc:
        console.print(f"[red]workload: {safe(exc)}")
        raise typer.Exit(2) from None
    key = os.environ.get("LAMBDA_API_KEY") or "mock-lambda-key"
    config = MockCloudConfig(
        api_key=key,
        speed=speed,
        boot_s=boot_s,
        node_port=node_port,
        node_token=node_token,
        quota=quota,
        capacity=default_capacity(capacity),
        api_url=f"http://127.0.0.1:{port}",
        workload=jobs,
        nodes=not no_nodes,
    )
    source = "LAMBDA_API_KEY" if os.environ.get("LAMBDA_API_KEY") else "the default mock-lambda-key"
    console.print(
        f"mock Lambda Cloud on http://127.0.0.1:{port} (key: {source}), speed ×{speed:g}, "
        f"{len(jobs)} jobs, nodes on 127.0.0.N:{node_port}"
    )
    uvicorn.run(
        create_mock_cloud_app(MockCloudState(config)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
