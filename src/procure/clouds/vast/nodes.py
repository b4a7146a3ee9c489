"""The mock Vast.ai instances' GPU nodes: the real GPU node service on its own 127.0.0.N and the
mock's host port, started when an instance is created with a mapped port and stopped when it
is outbid, its host dies or it is destroyed. Its token is the launch's GPU_WORKER_TOKEN."""

from __future__ import annotations

from procure.clouds.lambda_cloud.simnvml import SimGpu
from procure.clouds.mockworld import nodes as mocknodes
from procure.clouds.mockworld.nodes import Node, Nodes
from procure.clouds.vast.mockstate import MockInstance, MockVastState
from procure.gpu.settings import GpuWorkerSettings


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


def node_keeper(state: MockVastState) -> Nodes[int]:
    """One node per live instance that maps a port: started at create, stopped at its end."""

    def live() -> dict[int, MockInstance]:
        now = state.now()
        return {i.id: i for i in state.instances.values() if not i.ended(now) and i.container_ports}

    async def start(inst: MockInstance, used: set[str]) -> Node:
        return await mocknodes.start_node(
            instance_id=str(inst.id),
            settings=node_settings(state, inst),
            gpus=lambda: gpus(state, inst),
            port=state.config.host_port,
            used=used,
            first_ip=state.config.first_ip,
        )

    return Nodes(state.lock, live, start)
