"""The mock cloud's instances' GPU nodes: the real GPU node service (`gpu.service`) over a
simulated NVML, each on its own loopback address (127.0.0.N; all of 127/8 is loopback on Linux)
and the one node port, so an instance's `ip` is where its node really answers. Its dead-man
switch terminates its own instance through the cloud's API, as on a real instance."""

from __future__ import annotations

import shlex
import sys

from procure.clouds.lambda_cloud.mockstate import MockCloudState, MockInstance
from procure.clouds.mockworld import nodes as mocknodes
from procure.clouds.mockworld.nodes import Node, Nodes
from procure.gpu.settings import GpuWorkerSettings


def env_from_user_data(user_data: str | None) -> dict[str, str]:
    """The environment a launch's `user_data` exports, as the instance's shell would see it:
    every line `export NAME=VALUE` (VALUE in shell quoting, as `shlex.quote` writes it; more
    than one NAME=VALUE per line allowed). Other lines are the start-up script and ignored; a
    line that does not parse is skipped. This is the format `LambdaCloud.launch_spec` writes:

        #!/bin/bash
        export GPU_WORKER_TOKEN='tok'
        export PROCURE_JOB=job-1
        <the start-up script>
    """
    env: dict[str, str] = {}
    for line in (user_data or "").splitlines():
        if not line.lstrip().startswith("export "):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if sep and name.isidentifier():
                env[name] = value
    return env


def stop_command(state: MockCloudState, instance_id: str) -> str:
    """The node's stop action: terminate its own instance through the cloud's API (the command
    an operator would set as GPU_WORKER_ON_ORPHAN on a real Lambda instance)."""
    env = f"LAMBDA_API_URL={shlex.quote(state.config.api_url)} "
    env += f"LAMBDA_API_KEY={shlex.quote(state.config.api_key)}"
    module = "procure.clouds.lambda_cloud.selfstop"
    return f"{env} {shlex.quote(sys.executable)} -m {module} {shlex.quote(instance_id)}"


def node_settings(state: MockCloudState, inst: MockInstance) -> GpuWorkerSettings:
    # Every field that the environment could set is given, so a developer's .env (an
    # orchestrator, Ollama) never reaches the simulated nodes.
    return GpuWorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        GPU_WORKER_TOKEN=inst.node_token or state.config.node_token,
        GPU_WORKER_NVML_CACHE_S=0.0,
        OLLAMA_URL=None,
        ORCHESTRATOR_URL=None,
        CAPABILITY_NAME=f"agent-net-{inst.id[:12]}",
        GPU_WORKER_ON_ORPHAN=stop_command(state, inst.id) if state.config.api_url else None,
        GPU_WORKER_ORPHAN_TIMEOUT_S=30.0,
    )


async def start_node(state: MockCloudState, inst: MockInstance, used: set[str]) -> Node:
    return await mocknodes.start_node(
        instance_id=inst.id,
        settings=node_settings(state, inst),
        gpus=lambda: state.gpus(inst.id),
        port=state.config.node_port,
        used=used,
        first_ip=state.config.first_ip,
    )


def node_keeper(state: MockCloudState) -> Nodes[str]:
    """One node per live instance: started at launch, stopped when the instance ends."""

    def live() -> dict[str, MockInstance]:
        return {i.id: i for i in state.instances.values() if i.ended_at is None}

    return Nodes(state.lock, live, lambda inst, used: start_node(state, inst, used))
