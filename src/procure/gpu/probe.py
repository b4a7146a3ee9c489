"""The one place that reads NVML (through nvidia-ml-py's `pynvml`): GPU count and per-GPU figures.
Everything else takes the `Probe` as data. Never raises: no driver is `gpu_count 0` and a reason,
an error on one GPU is reported on that GPU alone, and XID events are counted where supported."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from types import ModuleType
from typing import Any

from procure.bounds import clip

MIB = 1 << 20


@dataclass(frozen=True)
class Gpu:
    """One GPU's figures; a figure the GPU does not support is None. `error` is set when the
    driver failed on this GPU (its other figures may then be missing)."""

    index: int
    name: str | None = None
    uuid: str | None = None
    memory_used_mb: int | None = None
    memory_free_mb: int | None = None
    memory_total_mb: int | None = None
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    energy_mj: int | None = None
    xid_errors: int | None = None  # XID events seen since the node started; None: not watched
    last_xid: int | None = None  # the last XID seen (dcgm's DCGM_FI_DEV_XID_ERRORS)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    """What NVML said at `read_at` (Unix seconds). `reason` says why there are no figures."""

    gpu_count: int
    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str | None = None
    reason: str | None = None
    read_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu_count": self.gpu_count,
            "driver_version": self.driver_version,
            "reason": self.reason,
            "read_at": self.read_at,
            "gpus": [g.to_json() for g in self.gpus],
        }


def load_nvml() -> ModuleType | None:
    """The real `pynvml`, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def read_nvml(nvml: ModuleType | None = None, xids: XidWatch | None = None) -> Probe:
    """Read every GPU once. `nvml` is the pynvml module (tests pass a fake one); default: the
    real one. With `xids`, each GPU also carries the XID events drained since the last read."""
    nvml = nvml if nvml is not None else load_nvml()
    now = time.time()
    if nvml is None:
        return Probe(0, reason="nvidia-ml-py is not installed, so NVML cannot be read", read_at=now)
    try:
        nvml.nvmlInit()
    except Exception as exc:  # any failure to start NVML is a plain answer, never a traceback
        return Probe(0, reason=_init_failure(nvml, exc), read_at=now)
    try:
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
        except Exception:  # the version is a nicety; the figures still count
            driver = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return Probe(0, driver_version=_text(driver), reason=f"NVML: {_describe(exc)}")
        gpus = [_read_gpu(nvml, i) for i in range(count)]
        if xids is not None:
            xids.start(nvml)
            xids.drain(nvml)
            gpus = [replace(g, **xids.figures(g.index)) for g in gpus]
        reason = None if count else "the NVIDIA driver is loaded but reports no GPU"
        return Probe(count, gpus, _text(driver), reason, now)
    finally:
        # Nothing to do about a failed shutdown, and the figures are already read.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def nvml_reader(nvml: ModuleType | None = None) -> Callable[[], Probe]:
    """`read_nvml` with an `XidWatch` kept across reads: what the worker uses."""
    xids = XidWatch()
    return lambda: read_nvml(nvml, xids)


class XidWatch:
    """An NVML event set per GPU for critical XID errors, registered once and drained without
    blocking on each read: a count and the last XID per GPU. Best effort: a GPU (or binding)
    without events has None figures. Not thread-safe; `CachedProbe` serialises the reads."""

    MAX_DRAIN = 1000  # per GPU per read: a storm of events must not stall the probe

    def __init__(self) -> None:
        self._sets: dict[int, Any] | None = None  # None: not started yet
        self.counts: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def start(self, nvml: ModuleType) -> None:
        """Register the event sets once. It takes an NVML reference of its own and keeps it:
        nvmlInit/nvmlShutdown are reference-counted, so `read_nvml`'s shutdown after each
        read then leaves NVML, and the event sets, alive."""
        if self._sets is not None:
            return
        try:
            nvml.nvmlInit()
            count = int(nvml.nvmlDeviceGetCount())
        except Exception:  # no driver now: try again on the next read
            return
        self._sets = {i: self._register(nvml, i) for i in range(count)}
        self.counts = {i: 0 for i, es in self._sets.items() if es is not None}

    def _register(self, nvml: ModuleType, index: int) -> Any:
        event_set = None
        try:
            event_set = nvml.nvmlEventSetCreate()
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
            return event_set
        except Exception:  # unsupported on this GPU (or these bindings): no XID figures
            if event_set is not None:
                with contextlib.suppress(Exception):
                    nvml.nvmlEventSetFree(event_set)
            return None

    def drain(self, nvml: ModuleType) -> None:
        for index, event_set in (self._sets or {}).items():
            if event_set is None:
                continue
            for _ in range(self.MAX_DRAIN):
                try:
                    event = nvml.nvmlEventSetWait(event_set, 0)  # 0 ms: never block a read
                except Exception:  # NVMLError_Timeout: nothing pending (or the GPU is lost)
                    break
                if int(event.eventType) & int(nvml.nvmlEventTypeXidCriticalError):
                    self.counts[index] += 1
                    self.last[index] = int(event.eventData)

    def figures(self, index: int) -> dict[str, int | None]:
        if index not in self.counts:
            return {}
        return {"xid_errors": self.counts[index], "last_xid": self.last.get(index)}


def _init_failure(nvml: ModuleType, exc: Exception) -> str:
    if _is(nvml, exc, "NVMLError_LibraryNotFound"):
        return "no NVIDIA driver found (the NVML library is not installed on this machine)"
    if _is(nvml, exc, "NVMLError_DriverNotLoaded"):
        return "no NVIDIA driver loaded (the NVML library is present but the driver is not)"
    if _is(nvml, exc, "NVMLError_NoPermission"):
        return "NVML refused access to the GPUs (no permission)"
    return f"NVML could not start: {_describe(exc)}"


def _read_gpu(nvml: ModuleType, index: int) -> Gpu:
    """One GPU's figures. An NVML error on it becomes its `error`; the others are unaffected."""
    figures: dict[str, Any] = {}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        figures["name"] = _text(nvml.nvmlDeviceGetName(handle))
        figures["uuid"] = _text(nvml.nvmlDeviceGetUUID(handle))
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        figures["memory_used_mb"] = int(memory.used) // MIB
        figures["memory_free_mb"] = int(memory.free) // MIB
        figures["memory_total_mb"] = int(memory.total) // MIB
        rates = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        if rates is not None:
            figures["utilization_gpu_pct"] = int(rates.gpu)
            figures["utilization_memory_pct"] = int(rates.memory)
        temperature = _optional(
            nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        figures["temperature_c"] = None if temperature is None else int(temperature)
        figures["power_w"] = _milli(_optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle))
        figures["power_limit_w"] = _milli(
            _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        )
        sm = _optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
        mem = _optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM)
        figures["sm_clock_mhz"] = None if sm is None else int(sm)
        figures["mem_clock_mhz"] = None if mem is None else int(mem)
        energy = _optional(nvml, nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        figures["energy_mj"] = None if energy is None else int(energy)
    except Exception as exc:  # a lost GPU, a driver fault, a surprise: this GPU only
        return Gpu(index, error=_describe(exc), **figures)
    return Gpu(index, **figures)


def _optional(nvml: ModuleType, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, or None when this GPU does not support it (not an error: many boards lack
    power or energy readings)."""
    try:
        return fn(*args)
    except Exception as exc:
        if any(
            _is(nvml, exc, n)
            for n in ("NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoData")
        ):
            return None
        raise


def _is(nvml: ModuleType, exc: Exception, name: str) -> bool:
    cls = getattr(nvml, name, None)
    return isinstance(cls, type) and isinstance(exc, cls)


def _describe(exc: Exception) -> str:
    return clip(f"{type(exc).__name__}: {exc}", 300)


def _milli(value: Any) -> float | None:
    return None if value is None else round(int(value) / 1000, 3)


def _text(value: Any) -> str | None:
    # Older bindings answer bytes, newer str.
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class CachedProbe:
    """Reads NVML at most once per `ttl_s`, however many requests ask at once: concurrent callers
    wait for the one read in flight. The read runs in a thread (NVML calls block)."""

    def __init__(
        self,
        read: Callable[[], Probe] = read_nvml,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: Probe | None = None
        self._at = 0.0
        self.reads = 0

    async def get(self) -> Probe:
        async with self._lock:
            if self._last is None or self._clock() - self._at >= self._ttl_s:
                self._last = await asyncio.to_thread(self._read)
                self._at = self._clock()
                self.reads += 1
            return self._last
