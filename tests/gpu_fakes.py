"""Fakes at the GPU node's boundaries: an NVML module (pynvml's names and error classes), a mock
Ollama speaking its wire format, and a mock go-livepeer orchestrator speaking its BYOC API."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

MIB = 1 << 20
XID_EVENT = 0x8  # pynvml.nvmlEventTypeXidCriticalError


class NVMLError(Exception):
    pass


def _error_class(name: str, message: str) -> type[NVMLError]:
    return type(name, (NVMLError,), {"__str__": lambda self: message})


ERRORS = {
    name: _error_class(name, message)
    for name, message in [
        ("NVMLError_LibraryNotFound", "NVML Shared Library Not Found"),
        ("NVMLError_DriverNotLoaded", "Driver Not Loaded"),
        ("NVMLError_NotSupported", "Not Supported"),
        ("NVMLError_GpuIsLost", "GPU is lost"),
        ("NVMLError_Unknown", "Unknown Error"),
        ("NVMLError_Timeout", "Timeout"),
    ]
}


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total_mb: int = 81559
    used_mb: int = 6321
    util: int = 37
    mem_util: int = 12
    temperature: int = 54
    power_mw: int = 123_456
    limit_mw: int = 700_000
    fails: str | None = None  # an NVML error class raised when reading its memory
    power_supported: bool = True
    events_supported: bool = True
    pending_xids: list[int] = field(default_factory=list)  # XID events not yet waited for

    def xid(self, code: int) -> None:
        """The driver reports XID `code` on this GPU (as NVML's critical-XID event)."""
        self.pending_xids.append(code)


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: str | None = None
    reads: int = 0

    def module(self) -> types.ModuleType:
        """A module with pynvml's names, backed by `gpus`."""
        m = types.ModuleType("pynvml")
        m.NVMLError = NVMLError  # type: ignore[attr-defined]
        for name, cls in ERRORS.items():
            setattr(m, name, cls)
        m.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
        m.NVML_CLOCK_SM = 1  # type: ignore[attr-defined]
        m.NVML_CLOCK_MEM = 2  # type: ignore[attr-defined]
        m.nvmlEventTypeXidCriticalError = XID_EVENT  # type: ignore[attr-defined]

        def init() -> None:
            if self.init_error:
                raise ERRORS[self.init_error]()
            self.reads += 1

        def memory(h: FakeGpu) -> Any:
            if h.fails:
                raise ERRORS[h.fails]()
            free = h.total_mb - h.used_mb
            return types.SimpleNamespace(
                total=h.total_mb * MIB, used=h.used_mb * MIB, free=free * MIB
            )

        def power(h: FakeGpu) -> int:
            if not h.power_supported:
                raise ERRORS["NVMLError_NotSupported"]()
            return h.power_mw

        def register(h: FakeGpu, types_: int, event_set: list[FakeGpu]) -> None:
            if not h.events_supported:
                raise ERRORS["NVMLError_NotSupported"]()
            if types_ & XID_EVENT:
                event_set.append(h)

        def wait(event_set: list[FakeGpu], timeout_ms: int) -> Any:
            # The real call blocks up to timeout_ms; with nothing pending it raises Timeout.
            for h in event_set:
                if h.pending_xids:
                    code = h.pending_xids.pop(0)
                    return types.SimpleNamespace(
                        device=h, eventType=XID_EVENT, eventData=code, gpuInstanceId=0xFFFFFFFF
                    )
            raise ERRORS["NVMLError_Timeout"]()

        functions = {
            "nvmlInit": init,
            "nvmlShutdown": lambda: None,
            "nvmlSystemGetDriverVersion": lambda: "550.54.15",
            "nvmlDeviceGetCount": lambda: len(self.gpus),
            "nvmlDeviceGetHandleByIndex": lambda i: self.gpus[i],
            "nvmlDeviceGetName": lambda h: h.name.encode(),  # older bindings answer bytes
            "nvmlDeviceGetUUID": lambda h: h.uuid,
            "nvmlDeviceGetMemoryInfo": memory,
            "nvmlDeviceGetUtilizationRates": lambda h: types.SimpleNamespace(
                gpu=h.util, memory=h.mem_util
            ),
            "nvmlDeviceGetTemperature": lambda h, sensor: h.temperature,
            "nvmlDeviceGetPowerUsage": power,
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: h.limit_mw,
            "nvmlDeviceGetClockInfo": lambda h, clock: 1980 if clock == 1 else 2619,
            "nvmlDeviceGetTotalEnergyConsumption": lambda h: 987_654_321,
            "nvmlEventSetCreate": lambda: [],
            "nvmlDeviceRegisterEvents": register,
            "nvmlEventSetWait": wait,
            "nvmlEventSetFree": lambda event_set: event_set.clear(),
        }
        for name, fn in functions.items():
            setattr(m, name, fn)
        return m


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(uuid="GPU-aaaa", used_mb=6321, util=37),
        FakeGpu(uuid="GPU-bbbb", used_mb=1000, util=90, temperature=71),
    ]


# --- Ollama ---------------------------------------------------------------------------------

TAGS = {
    "models": [
        {
            "name": "codellama:34b-instruct-q4_K_M",
            "model": "codellama:34b-instruct-q4_K_M",
            "modified_at": "2025-06-25T10:00:00.000000000Z",
            "size": 20_219_831_392,
            "digest": "f3a1" * 16,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "34B",
                "quantization_level": "Q4_K_M",
            },
        },
        {
            "name": "llama3.2:1b",
            "model": "llama3.2:1b",
            "modified_at": "2025-06-20T10:00:00Z",
            "size": 1_321_098_329,
            "digest": "baf6" * 16,
            "details": {"format": "gguf", "family": "llama", "parameter_size": "1.2B"},
        },
    ]
}
LOADED = {
    "models": [
        {
            **TAGS["models"][0],
            "expires_at": "2025-06-25T10:05:00Z",
            "size_vram": 6321 * MIB,
        }
    ]
}


@dataclass
class OllamaBehaviour:
    mode: str = "ok"  # ok | error | slow | garbage | empty
    slow_s: float = 5.0
    calls: int = 0


def mock_ollama(behaviour: OllamaBehaviour) -> FastAPI:
    """Ollama's `/api/tags` and `/api/ps`, answering as `behaviour.mode` says."""
    app = FastAPI()

    async def answer(request: Request, body: dict[str, Any]) -> Response:
        behaviour.calls += 1
        if behaviour.mode == "error":
            return JSONResponse({"error": "model runner has unexpectedly stopped"}, 500)
        if behaviour.mode == "slow":
            # Slow for as long as the caller waits: once it hung up, nothing is left to answer,
            # and a handler still asleep would hold this server's stop for the rest of slow_s.
            deadline = time.monotonic() + behaviour.slow_s
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)
        if behaviour.mode == "garbage":
            return PlainTextResponse("<html>bad gateway</html>", 502)
        if behaviour.mode == "empty":
            return JSONResponse({"models": []})
        return JSONResponse(body)

    @app.get("/api/tags")
    async def tags(request: Request) -> Response:
        return await answer(request, TAGS)

    @app.get("/api/ps")
    async def ps(request: Request) -> Response:
        return await answer(request, LOADED)

    return app


# --- go-livepeer orchestrator (BYOC) -------------------------------------------------------


@dataclass
class Orchestrator:
    secret: str = "orch-secret"
    fail_first: int = 0  # answer `fail_status` to this many registrations first
    fail_status: int = 503
    registered: dict[str, dict[str, Any]] = field(default_factory=dict)
    registrations: int = 0
    attempts: int = 0
    unregistered: list[str] = field(default_factory=list)
    headers_seen: list[str] = field(default_factory=list)

    def forget(self) -> None:
        """As an orchestrator that restarted: it knows no capability any more."""
        self.registered.clear()


def mock_orchestrator(orch: Orchestrator) -> FastAPI:
    """`/capability/register` and `/capability/unregister` as go-livepeer answers them."""
    app = FastAPI()

    def authorised(request: Request) -> bool:
        orch.headers_seen.append(request.headers.get("authorization", ""))
        return request.headers.get("authorization") == orch.secret

    @app.api_route("/capability/register", methods=["GET", "POST", "PUT", "DELETE"])
    async def register(request: Request) -> Response:
        if request.method != "POST":
            return PlainTextResponse("method not allowed", 405)
        orch.attempts += 1
        if not authorised(request):
            return PlainTextResponse("invalid_authorization", 400)
        if orch.attempts <= orch.fail_first:
            return PlainTextResponse("orchestrator starting", orch.fail_status)
        body = await request.json()
        orch.registered[body["name"]] = body  # re-registering replaces the entry
        orch.registrations += 1
        return PlainTextResponse("ok")

    @app.post("/capability/unregister")
    async def unregister(request: Request) -> Response:
        if not authorised(request):
            return PlainTextResponse("invalid_authorization", 400)
        name = (await request.body()).decode()
        orch.registered.pop(name, None)
        orch.unregistered.append(name)
        return PlainTextResponse("ok")

    return app


def eventually(condition: Callable[[], Any], what: str, within_s: float = 30) -> Any:
    """What `condition` returns once it is truthy, waiting up to `within_s` (generous: a busy
    machine), else AssertionError naming `what`."""
    deadline = time.monotonic() + within_s
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


@contextmanager
def in_process_node(token: str, **env: Any) -> Iterator[tuple[Any, httpx.Client]]:
    """A GPU node (`create_gpu_worker_app`, two fake GPUs) served on loopback, with a client
    sending `token` as its bearer; `env`: its settings by their environment names."""
    from procure.gpu.probe import read_nvml
    from procure.gpu.service import create_gpu_worker_app
    from procure.gpu.settings import GpuWorkerSettings
    from procure.local import serve

    settings = GpuWorkerSettings(_env_file=None, **env)  # type: ignore[call-arg]
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=15) as client:
            yield server, client
    finally:
        server.stop()
