"""The mock cloud's instances' GPU nodes: the real GPU node service (`gpu.service`) over a
simulated NVML, each on its own loopback address (127.0.0.N; all of 127/8 is loopback on Linux)
and the one node port, so an instance's `ip` is where its node really answers. Its dead-man
switch terminates its own instance through the cloud's API, as on a real instance."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys

from procure.clouds import mocknodes
from procure.clouds.lambda_cloud.mockstate import MockCloudState, MockInstance
from procure.clouds.mocknodes import Node
from procure.gpu.settings import GpuWorkerSettings

log = logging.getLogger(__name__)


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


class Nodes:
    """Keeps one node per live instance: started at launch, stopped when the instance ends."""

    def __init__(self, state: MockCloudState) -> None:
        self.state = state
        self.nodes: dict[str, Node] = {}
        self._lock = asyncio.Lock()

    async def reconcile(self) -> None:
        async with self._lock:
            with self.state.lock:
                wanted = {i.id: i for i in self.state.instances.values() if i.ended_at is None}
            for instance_id in [i for i in self.nodes if i not in wanted]:
                node = self.nodes.pop(instance_id)
                await asyncio.to_thread(node.stop)
            for instance_id, inst in wanted.items():
                if instance_id in self.nodes:
                    continue
                try:
                    node = await start_node(self.state, inst, {n.ip for n in self.nodes.values()})
                except OSError as exc:
                    log.warning("instance %s has no node: %s", instance_id, exc)
                    continue
                self.nodes[instance_id] = node
                with self.state.lock:
                    inst.ip = node.ip

    async def stop_all(self) -> None:
        async with self._lock:
            nodes, self.nodes = list(self.nodes.values()), {}
            await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))
