"""The mock clouds' instances' GPU nodes: the real GPU node service (`gpu.service`) over a
simulated NVML, each on its own loopback address (127.0.0.N; all of 127/8 is loopback on Linux)
and one port, so an instance's address is where its node really answers; and `Nodes`, the loop
that keeps one node per live instance. Each mock says which instances are live and how their
node is built (token, GPUs, dead-man action)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from procure.clouds.lambda_cloud.simnvml import SimGpu, sim_nvml
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.uvserver import Server, local_server

log = logging.getLogger(__name__)
LAST_IP = 254
K = TypeVar("K", bound=Hashable)


@dataclass
class Node:
    instance_id: str
    ip: str
    port: int
    server: Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.exit()
        self.thread.join(timeout=10)


def bind_loopback(used: set[str], first: int, port: int) -> tuple[str, socket.socket]:
    """A socket bound to the first free 127.0.0.N:port (N from `first`) not in `used`."""
    for n in range(first, LAST_IP + 1):
        ip = f"127.0.0.{n}"
        if ip in used:
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
            # Listening at once: with SO_REUSEADDR another socket may bind the same address
            # until one listens, and its listen would then fail (uvicorn's listen again is
            # harmless).
            sock.listen(128)
        except OSError:  # taken by someone else (another mock, another test): the next one
            sock.close()
            continue
        return ip, sock
    raise OSError(f"no loopback address left for port {port}")


async def start_node(
    *,
    instance_id: str,
    settings: GpuWorkerSettings,
    gpus: Callable[[], list[SimGpu]],
    port: int,
    used: set[str],
    first_ip: int = 2,
) -> Node:
    """Bind 127.0.0.N:<port>, serve the GPU node there (a uvicorn server on its own thread) over
    the simulated GPUs `gpus()`, and return once it accepts connections."""
    ip, sock = bind_loopback(used, first_ip, port)
    module = sim_nvml(gpus)
    app = create_gpu_worker_app(
        settings, read=lambda: read_nvml(module), port=port, hostname=ip.replace(".", "-")
    )
    server = local_server(app, ip, port)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"node-{ip}", daemon=True
    )
    thread.start()
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if not thread.is_alive():
                    raise OSError(f"the node on {ip}:{port} did not start")
                await asyncio.sleep(0.01)
    finally:
        if not server.started:
            server.should_exit = True
            with contextlib.suppress(OSError):
                sock.close()
    return Node(instance_id, ip, port, server, thread)


class Nodes(Generic[K]):
    """Keeps one node per live instance: started once it is live, stopped once it is not.
    `live()` (called under `lock`) gives the live instances by id; `start(instance, used)`
    starts one's node on an address not in `used`; `gone(id)` (under `lock`) tidies the
    instance after its node stops. A started node's address becomes the instance's `ip`."""

    def __init__(
        self,
        lock: Any,  # the mock state's lock (a threading lock)
        live: Callable[[], dict[K, Any]],
        start: Callable[[Any, set[str]], Awaitable[Node]],
        *,
        gone: Callable[[K], None] | None = None,
        what: str = "instance",
    ) -> None:
        self.lock, self.live, self.start, self.gone, self.what = lock, live, start, gone, what
        self.nodes: dict[K, Node] = {}
        self._lock = asyncio.Lock()

    async def reconcile(self) -> None:
        async with self._lock:
            with self.lock:
                wanted = self.live()
            for key in [k for k in self.nodes if k not in wanted]:
                await asyncio.to_thread(self.nodes.pop(key).stop)
                if self.gone is not None:
                    with self.lock:
                        self.gone(key)
            for key, inst in wanted.items():
                if key in self.nodes:
                    continue
                try:
                    node = await self.start(inst, {n.ip for n in self.nodes.values()})
                except OSError as exc:
                    log.warning("%s %s has no node: %s", self.what, key, exc)
                    continue
                self.nodes[key] = node
                with self.lock:
                    inst.ip = node.ip

    async def stop_all(self) -> None:
        async with self._lock:
            nodes, self.nodes = list(self.nodes.values()), {}
            await asyncio.gather(*(asyncio.to_thread(n.stop) for n in nodes))
