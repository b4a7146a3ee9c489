"""A small fake cloud for the fleet's tests: it implements `clouds.base.Cloud` in-process (and
over HTTP, for a controller in a subprocess), and each of its instances runs the real GPU node
service with a fake NVML on its own loopback address (127.0.0.N, one shared port)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gpu_fakes import FakeGpu, FakeNvml
from procure.clouds.base import (
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    InstanceType,
    ProviderError,
    QuotaError,
)
from procure.gpu.probe import nvml_reader
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, free_port, serve

NODE_TOKEN = "node-token"
PRICE = 1_290_000  # gpu_1x_a100, micro-USD per hour
ERRORS: dict[str, type[CloudError]] = {
    "capacity": CapacityError,
    "quota": QuotaError,
    "auth": AuthError,
    "provider": ProviderError,
}


def serve_on(app: FastAPI, host: str, port: int) -> LocalServer:
    return serve(app, port, host=host)


@dataclass
class Node:
    gpu: FakeGpu
    server: LocalServer


class ManualClock:
    """The controller's clock in tests: time moves when the test says so."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class FakeCloud:
    node_port: int = field(default_factory=free_port)
    price: int = PRICE
    boot_scans: int = 0  # how many listings an instance stays `booting`
    errors: dict[str, list[CloudError]] = field(default_factory=dict)  # op -> errors to raise
    instances_: dict[str, Instance] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    launches: list[str] = field(default_factory=list)  # names launched, in order
    terminations: list[str] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _booting: dict[str, int] = field(default_factory=dict)

    def fail(self, op: str, kind: str, times: int = 1) -> None:
        self.errors.setdefault(op, []).extend(
            ERRORS[kind](f"injected {kind}") for _ in range(times)
        )

    def _maybe_fail(self, op: str) -> None:
        if self.errors.get(op):
            raise self.errors[op].pop(0)

    def add(self, util: int = 50, name: str | None = None) -> str:
        """An instance that already runs (launched by someone, some time ago)."""
        return self._start(name, util)

    def _start(self, name: str | None, util: int) -> str:
        n = next(self._ids)
        instance_id = f"i-{n:04d}"
        ip = f"127.0.0.{n + 1}"
        gpu = FakeGpu(uuid=f"GPU-{n}", util=util, used_mb=2000)
        module = FakeNvml([gpu]).module()
        settings = GpuWorkerSettings(
            token=NODE_TOKEN, nvml_cache_s=0, on_orphan="true", orchestrator_url=None
        )
        app = create_gpu_worker_app(settings, read=nvml_reader(module))
        self.nodes[instance_id] = Node(gpu, serve_on(app, ip, self.node_port))
        status = "booting" if self.boot_scans else "active"
        self._booting[instance_id] = self.boot_scans
        self.instances_[instance_id] = Instance(
            instance_id, name, status, "gpu_1x_a100", "us-east-1", ip, self.price
        )
        return instance_id

    def set_util(self, instance_id: str, util: int) -> None:
        self.nodes[instance_id].gpu.util = util

    def xid(self, instance_id: str, code: int) -> None:
        self.nodes[instance_id].gpu.xid(code)

    def live(self) -> list[Instance]:
        return [i for i in self.instances_.values() if i.status not in ("terminated",)]

    def lease(self, instance_id: str) -> dict[str, Any]:
        return dict(self.nodes[instance_id].server.app.state.deadman.to_json())

    # --- Cloud ---------------------------------------------------------------------------

    async def instance_types(self) -> list[InstanceType]:
        self._maybe_fail("types")
        return [InstanceType("gpu_1x_a100", "1x A100", 1, self.price, ["us-east-1"])]

    async def instances(self) -> list[Instance]:
        self._maybe_fail("instances")
        for instance_id, left in list(self._booting.items()):
            if left <= 0:
                continue
            self._booting[instance_id] = left - 1
            if left == 1:
                self.instances_[instance_id] = replace(
                    self.instances_[instance_id], status="active"
                )
        return self.live()

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        self._maybe_fail("launch")
        self.launches.append(name)
        return [await asyncio.to_thread(self._start, name, 95)]

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        self._maybe_fail("terminate")
        done = []
        for instance_id in instance_ids:
            instance = self.instances_.get(instance_id)
            if instance is None or instance.status == "terminated":
                continue  # idempotent
            self.terminations.append(instance_id)
            self.instances_[instance_id] = replace(instance, status="terminated")
            node = self.nodes.pop(instance_id)
            await asyncio.to_thread(node.server.stop)
            done.append(self.instances_[instance_id])
        return done

    async def aclose(self) -> None:
        return None

    def close(self) -> None:
        for node in self.nodes.values():
            node.server.stop()
        self.nodes.clear()


# --- the same cloud over HTTP, for a controller in another process ---------------------------


def _instance_json(i: Instance) -> dict[str, Any]:
    return {
        "id": i.id,
        "name": i.name,
        "status": i.status,
        "instance_type": i.instance_type,
        "region": i.region,
        "ip": i.ip,
        "price_per_hour": i.price_per_hour,
        "gpus": i.gpus,
    }


def cloud_app(cloud: FakeCloud) -> FastAPI:
    app = FastAPI()

    @app.get("/types")
    async def types() -> list[dict[str, Any]]:
        return [{"name": t.name, "price": t.price_per_hour} for t in await cloud.instance_types()]

    @app.get("/instances")
    async def instances() -> list[dict[str, Any]]:
        return [_instance_json(i) for i in await cloud.instances()]

    @app.post("/launch")
    async def launch(request: Request) -> JSONResponse:
        body = await request.json()
        ids = await cloud.launch(
            instance_type=body["type"], region=body["region"], name=body["name"], ssh_key_names=[]
        )
        return JSONResponse({"ids": ids})

    @app.post("/terminate")
    async def terminate(request: Request) -> list[dict[str, Any]]:
        body = await request.json()
        return [_instance_json(i) for i in await cloud.terminate(body["ids"])]

    return app


class HttpCloud:
    """`Cloud` over `cloud_app`."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    async def instance_types(self) -> list[InstanceType]:
        found = (await self.http.get("/types")).json()
        return [InstanceType(t["name"], t["name"], 1, t["price"], ["us-east-1"]) for t in found]

    async def instances(self) -> list[Instance]:
        return [Instance(**i) for i in (await self.http.get("/instances")).json()]

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        body = {"type": instance_type, "region": region, "name": name}
        return list((await self.http.post("/launch", json=body)).json()["ids"])

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        answer = (await self.http.post("/terminate", json={"ids": instance_ids})).json()
        return [Instance(**i) for i in answer]

    async def aclose(self) -> None:
        await self.http.aclose()
