"""The mock Vast.ai instances' GPU nodes: the real GPU node service on its own 127.0.0.N and the
mock's host port, started when an instance is created with a mapped port and stopped when it
is outbid, its host dies or it is destroyed. Its token is the launch's GPU_WORKER_TOKEN."""

from __future__ import annotations

import asyncio
import logging

from procure.clouds import mocknodes
from procure.clouds.lambda_cloud.simnvml import SimGpu
from procure.clouds.mocknodes import Node
from procure.clouds.vast.mockstate import MockInstance, MockVastState
from procure.gpu.settings import GpuWorkerSettings

log = logging.getLogger(__name__)


def node_settings(state: MockVastState, inst: MockInstance) -> GpuWorkerSettings:
    # Every field the environment could set is given, so a developer's .env never reaches the
    # simulated nodes.
    return GpuWorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        GPU_WORKER_TOKEN=inst.env.get("GPU_WORKER_TOKEN") or state.config.node_token,
        GPU_WORKER_NVML_CACHE_S=0.0,
        OLLAMA_URL=None,
        ORCHESTRATOR_URL=None,
        CAPABILITY_NAME=f"vast-{inst.id}",
        GPU_WORKER_ON_ORPHAN=None,
    )


def gpus(state: MockVastState, inst: MockInstance) -> list[SimGpu]:
    m = inst.machine
    if inst.ended(state.now()):
        return []
    return [
        SimGpu(
            name=m.nvml_name or f"NVIDIA {m.gpu_name}",
            uuid=f"GPU-{inst.id:08d}-{index:04d}-vast-{m.ask_id:012d}",
            memory_total_mb=m.gpu_ram_mb,
            power_limit_w=m.power_limit_w,
        )
        for index in range(m.num_gpus)
    ]


class Nodes:
    """One node per live instance that maps a port: started at create, stopped at its end."""

    def __init__(self, state: MockVastState) -> None:
        self.state = state
        self.nodes: dict[int, Node] = {}
        self._lock = asyncio.Lock()

    async def reconcile(self) -> None:
        async with self._lock:
            with self.state.lock:
                now = self.state.now()
                wanted = {
                    i.id: i
                    for i in self.state.instances.values()
                    if not i.ended(now) and i.container_ports
                }
            for instance_id in [i for i in self.nodes if i not in wanted]:
                node = self.nodes.pop(instance_id)
                await asyncio.to_thread(node.stop)
            for instance_id, inst in wanted.items():
                if instance_id in self.nodes:
                    continue
                try:
                    node = await mocknodes.start_node(
                        instance_id=str(inst.id),
                        settings=node_settings(self.state, inst),
                        gpus=lambda inst=inst: gpus(self.state, inst),  # type: ignore[misc]
                        port=self.state.config.host_port,
                        used={n.ip for n in self.nodes.values()},
                        first_ip=self.state.config.first_ip,
                    )
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
