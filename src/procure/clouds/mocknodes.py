"""The mock clouds' instances' GPU nodes: the real GPU node service (`gpu.service`) over a
simulated NVML, each on its own loopback address (127.0.0.N; all of 127/8 is loopback on Linux)
and one port, so an instance's address is where its node really answers. Shared by the three
mock clouds; each builds the node's settings (token, dead-man action) itself."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from procure.clouds.lambda_cloud.simnvml import SimGpu, sim_nvml
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings

LAST_IP = 254


@dataclass
class Node:
    instance_id: str
    ip: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
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
    config = uvicorn.Config(app, host=ip, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
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
