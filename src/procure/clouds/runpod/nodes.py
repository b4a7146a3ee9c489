"""The mock RunPod's pods' GPU nodes: the real GPU node service over a simulated NVML, one per
pod that holds a machine (`clouds.mockworld.nodes`), each with its pod's own token (the launch's
env `GPU_WORKER_TOKEN`), stopped when the pod exits, errs or is deleted."""

from __future__ import annotations

from procure.clouds.lambda_cloud.simnvml import SimGpu
from procure.clouds.mockworld import nodes as mocknodes
from procure.clouds.mockworld.nodes import Node, Nodes
from procure.clouds.runpod.mockstate import MockPod, MockRunPodState
from procure.gpu.settings import GpuWorkerSettings

HOLDING = ("PROVISIONING", "STARTING", "RUNNING")  # a pod in these holds a machine


def node_keeper(state: MockRunPodState) -> Nodes[str]:
    """One GPU node per pod that holds a machine; stopped when the pod exits, errs or goes."""

    def live() -> dict[str, MockPod]:
        return {p.id: p for p in state.pods.values() if not p.deleted and p.status in HOLDING}

    def gone(pod_id: str) -> None:
        state.pods[pod_id].ip = None

    async def start(pod: MockPod, used: set[str]) -> Node:
        return await start_node(state, pod, used)

    return Nodes(state.lock, live, start, gone=gone, what="pod")


async def start_node(state: MockRunPodState, pod: MockPod, used: set[str]) -> Node:
    config = state.config
    # Every field the environment could set is given, so a developer's .env never reaches
    # the simulated nodes. The token is the pod's own (its env), as procure launches it.
    settings = GpuWorkerSettings(
        _env_file=None,  # type: ignore[call-arg]
        GPU_WORKER_TOKEN=pod.env.get("GPU_WORKER_TOKEN") or config.node_token,
        GPU_WORKER_NVML_CACHE_S=0.0,
        OLLAMA_URL=None,
        ORCHESTRATOR_URL=None,
        CAPABILITY_NAME=f"agent-net-{pod.id}",
        GPU_WORKER_ON_ORPHAN=None,
    )
    gpus = [
        SimGpu(
            name=pod.kind.id,
            uuid=f"GPU-{pod.id}-{index:04d}",
            memory_total_mb=pod.kind.memory_gb * 1024,
            power_limit_w=pod.kind.power_limit_w,
        )
        for index in range(pod.count)
    ]
    return await mocknodes.start_node(
        instance_id=pod.id,
        settings=settings,
        gpus=lambda: gpus,
        port=config.node_port,
        used=used,
        first_ip=config.first_ip,
    )
