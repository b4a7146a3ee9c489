"""The mock RunPod's pods' GPU nodes: the real GPU node service over a simulated NVML, one per
pod that holds a machine (`clouds.mocknodes`), each with its pod's own token (the launch's env
`GPU_WORKER_TOKEN`), stopped when the pod exits, errs or is deleted."""

from __future__ import annotations

import asyncio
import logging

from procure.clouds import mocknodes
from procure.clouds.lambda_cloud.simnvml import SimGpu
from procure.clouds.mocknodes import Node
from procure.clouds.runpod.mockstate import MockPod, MockRunPodState
from procure.gpu.settings import GpuWorkerSettings

log = logging.getLogger(__name__)


class Nodes:
    """One GPU node per pod that holds a machine; stopped when the pod exits, errs or goes."""

    def __init__(self, state: MockRunPodState) -> None:
        self.state = state
        self.nodes: dict[str, Node] = {}
        self._lock = asyncio.Lock()

    async def reconcile(self) -> None:
        async with self._lock:
            with self.state.lock:
                wanted = {
                    p.id: p
                    for p in self.state.pods.values()
                    if not p.deleted and p.status in ("PROVISIONING", "STARTING", "RUNNING")
                }
            for pod_id in [i for i in self.nodes if i not in wanted]:
                await asyncio.to_thread(self.nodes.pop(pod_id).stop)
                with self.state.lock:
                    self.state.pods[pod_id].ip = None
            for pod_id, pod in wanted.items():
                if pod_id in self.nodes:
                    continue
                try:
                    node = await self._start(pod)
                except OSError as exc:
                    log.warning("pod %s has no node: %s", pod_id, exc)
                    continue
                self.nodes[pod_id] = node
                with self.state.lock:
                    pod.ip = node.ip

    async def _start(self, pod: MockPod) -> Node:
        config = self.state.config
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
            used={n.ip for n in self.nodes.values()},
            first_ip=config.first_ip,
        )

    async def stop_all(self) -> None:
        async with self._lock:
            nodes, self.nodes = list(self.nodes.values()), {}
            await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))
