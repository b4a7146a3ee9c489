"""`procure mock-cloud --provider lambda|runpod|vast`: a local mock of that provider's API, with a
real GPU node (simulated NVML) per instance, on a clock that can run faster than real time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from procure.cli.common import check_port, console, fail, settings_errors
from procure.numbers import number, whole

DEFAULT_PORTS = {"lambda": 4100, "runpod": 4200, "vast": 4300}


def mock_cloud(
    provider: Annotated[
        str,
        typer.Option(
            help="Which provider's API to serve: lambda, runpod or vast",
            case_sensitive=False,
        ),
    ] = "lambda",
    port: Annotated[
        int | None,
        typer.Option(
            help="Port of the API on 127.0.0.1 (default: lambda 4100, runpod 4200, vast 4300)",
            parser=whole(1, 65535, "--port"),
        ),
    ] = None,
    speed: Annotated[
        float,
        typer.Option(help="Simulated seconds per real second", parser=number(0, 1e6, "--speed")),
    ] = 1.0,
    boot_s: Annotated[
        float,
        typer.Option(help="Booting → active, simulated s", parser=number(0, 86400, "--boot-s")),
    ] = 180.0,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of price drift and preemption", parser=whole(0, 2**32 - 1, "--seed")
        ),
    ] = 0,
    price_drift: Annotated[
        float,
        typer.Option(
            help="Prices move within ± this fraction of list, hour by hour",
            parser=number(0, 0.9, "--price-drift"),
        ),
    ] = 0.0,
    outbid_per_hour: Annotated[
        float,
        typer.Option(
            help="vast: chance per hour that a running bid is outbid (preempted)",
            parser=number(0, 3600, "--outbid-per-hour"),
        ),
    ] = 0.2,
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
    """Serve a provider's API on loopback: Lambda Cloud's v1 (key LAMBDA_API_KEY, else
    mock-lambda-key), RunPod's REST v2 (RUNPOD_API_KEY, else mock-runpod-key) or Vast.ai's
    (VAST_API_KEY, else mock-vast-key). Each instance that runs gets a GPU node at
    http://127.0.0.N:NODE_PORT; admin endpoints under /admin (bearer: the key) preempt instances,
    inject faults, move the clock and report billing (see README). --quota, --capacity,
    --workload and --synthetic-seed are Lambda's; --outbid-per-hour is Vast.ai's."""
    import uvicorn

    provider = provider.lower()
    if provider not in DEFAULT_PORTS:
        fail(f"--provider: choose lambda, runpod or vast, not {provider}", 2)
    port = port or DEFAULT_PORTS[provider]
    ignored = [
        flag
        for flag, value in (("--workload", workload), ("--synthetic-seed", synthetic_seed))
        if value is not None
    ]
    if provider != "lambda" and ignored:  # else the jobs a user asked for silently never come
        fail(f"{' and '.join(ignored)}: only the mock Lambda Cloud runs a workload", 2)
    check_port("127.0.0.1", port)  # before the banner saying where it serves
    nodes = "no GPU nodes" if no_nodes else f"nodes on 127.0.0.N:{node_port}"
    given = _provider_key(provider)  # as the clients read it: the environment, then `.env`
    if provider == "runpod":
        from procure.clouds.runpod.mock import serve_mock_cloud as serve_runpod
        from procure.clouds.runpod.mockstate import RunPodMockConfig

        source = "RUNPOD_API_KEY" if given else "mock-runpod-key"
        console.print(
            f"mock RunPod (REST v2) on http://127.0.0.1:{port} (key: {source}), speed ×{speed:g}, "
            f"pods' {nodes}"
        )
        serve_runpod(
            RunPodMockConfig(
                api_key=given or "mock-runpod-key",
                speed=speed,
                provision_s=boot_s / 3,
                start_s=boot_s * 2 / 3,
                node_port=node_port,
                node_token=node_token,
                seed=seed,
                price_drift=price_drift,
                nodes=not no_nodes,
            ),
            port=port,
        )
        return
    if provider == "vast":
        from procure.clouds.vast.mock import serve_mock_cloud as serve_vast

        source = "VAST_API_KEY" if given else "mock-vast-key"
        console.print(
            f"mock Vast.ai on http://127.0.0.1:{port} (key: {source}), speed ×{speed:g}, "
            f"bids outbid at {outbid_per_hour:g}/h"
        )
        serve_vast(
            port,
            api_key=given or "mock-vast-key",
            speed=speed,
            boot_s=boot_s,
            seed=seed,
            outbid_per_hour=outbid_per_hour,
            node_token=node_token,
            host_port=node_port,
            nodes=not no_nodes,
        )
        return

    from procure.clouds.lambda_cloud.catalogue import default_capacity
    from procure.clouds.lambda_cloud.mock import create_mock_cloud_app
    from procure.clouds.lambda_cloud.mockstate import MockCloudConfig, MockCloudState
    from procure.clouds.mockworld.workload import WorkloadError, load_csv, synthetic

    jobs = []
    try:
        if workload is not None:
            jobs = load_csv(workload)
        elif synthetic_seed is not None:
            jobs = synthetic(synthetic_seed)
    except (OSError, WorkloadError) as exc:
        fail(f"workload: {exc}", 2)
    key = given or "mock-lambda-key"
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
        seed=seed,
        price_drift=price_drift,
    )
    source = "LAMBDA_API_KEY" if given else "the default mock-lambda-key"
    console.print(
        f"mock Lambda Cloud on http://127.0.0.1:{port} (key: {source}), speed ×{speed:g}, "
        f"{len(jobs)} jobs, {nodes}"
    )
    uvicorn.run(
        create_mock_cloud_app(MockCloudState(config)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )


def _provider_key(provider: str) -> str | None:
    """The provider's API key as its client reads it (the environment, then `.env`): the mock
    wants the key the clients will send."""
    if provider == "runpod":
        from procure.clouds.runpod.settings import RunPodSettings as Kind
    elif provider == "vast":
        from procure.clouds.vast.settings import VastSettings as Kind  # type: ignore[assignment]
    else:
        from procure.clouds.lambda_cloud.settings import (  # type: ignore[assignment]
            LambdaSettings as Kind,
        )
    with settings_errors():
        key = Kind().api_key
    return key.get_secret_value() if key else None
