"""The one place that reads NVML (through nvidia-ml-py's `pynvml`): GPU count and per-GPU figures,
as many of dcgm-exporter's default counters as NVML gives (field values, PCIe throughput, GPM
where the GPU has it). Everything else takes the `Probe` as data. Never raises: no driver is
`gpu_count 0` and a reason, an error on one GPU is reported on that GPU alone, a figure the GPU
cannot give is None (never 0), and XID events are counted where supported."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
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
    # dcgm-exporter's other default counters, where NVML gives them.
    pci_bus_id: str | None = None
    memory_reserved_mb: int | None = None
    memory_temp_c: int | None = None
    enc_util_pct: int | None = None
    dec_util_pct: int | None = None
    pcie_replays: int | None = None  # total since boot
    pcie_tx_bytes_s: float | None = None  # rates over the last window
    pcie_rx_bytes_s: float | None = None
    nvlink_bandwidth_total: int | None = None  # NVLink tx + rx since boot, as NVML counts (KiB)
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    row_remap_failure: int | None = None
    vgpu_license_status: int | None = None
    gr_engine_active: float | None = None  # GPM ratios 0..1 over the last window
    tensor_active: float | None = None
    dram_active: float | None = None

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


def plainly(probe: Probe) -> str:
    """What a person should read first: whether this machine has GPUs, and which."""
    if probe.gpu_count == 0:
        return f"no GPU on this machine ({probe.reason or 'NVML found none'})"
    names = sorted({g.name or "unnamed GPU" for g in probe.gpus})
    return f"{probe.gpu_count} GPU(s): {', '.join(names)}"


def load_nvml() -> ModuleType | None:
    """The real `pynvml`, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def read_nvml(
    nvml: ModuleType | None = None, xids: XidWatch | None = None, gpm: GpmWatch | None = None
) -> Probe:
    """Read every GPU once. `nvml` is the pynvml module (tests pass a fake one); default: the
    real one. With `xids`, each GPU also carries the XID events drained since the last read;
    with `gpm`, the GPM ratios and PCIe rates since the last read (on GPUs with GPM)."""
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
        if gpm is not None and gpm.start(nvml):
            gpus = [g if g.error else replace(g, **gpm.figures(nvml, g.index)) for g in gpus]
        reason = None if count else "the NVIDIA driver is loaded but reports no GPU"
        return Probe(count, gpus, _text(driver), reason, now)
    finally:
        # Nothing to do about a failed shutdown, and the figures are already read.
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def nvml_reader(nvml: ModuleType | None = None) -> Callable[[], Probe]:
    """`read_nvml` with an `XidWatch` and a `GpmWatch` kept across reads: what the worker uses."""
    xids, gpm = XidWatch(), GpmWatch()
    return lambda: read_nvml(nvml, xids, gpm)


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
        figures |= _extras(nvml, handle)
    except Exception as exc:  # a lost GPU, a driver fault, a surprise: this GPU only
        return Gpu(index, error=_describe(exc), **figures)
    return Gpu(index, **figures)


def _maybe(nvml: ModuleType, name: str, *args: Any) -> Any:
    """`nvml.<name>(*args)`, or None where the bindings lack it or the GPU cannot answer: the
    extra figures are best effort and never make a GPU count as failing."""
    fn = getattr(nvml, name, None)
    if fn is None:
        return None
    try:
        return fn(*args)
    except Exception:
        return None


# NVML field ids (nvml.h) for figures that only the field-value API gives.
FI_MEMORY_TEMP = 82
FI_NVLINK_RAW_TX = 140  # KiB, data + protocol overhead, all links with scopeId UINT_MAX
FI_NVLINK_RAW_RX = 141
ALL_LINKS = 0xFFFFFFFF
VIRTUALIZATION_VGPU = 2  # NVML_GPU_VIRTUALIZATION_MODE_VGPU: a vGPU inside a virtual machine


def _extras(nvml: ModuleType, handle: Any) -> dict[str, Any]:
    """dcgm-exporter's default counters beyond the basic figures; absent ones stay None."""
    found: dict[str, Any] = {}
    pci = _maybe(nvml, "nvmlDeviceGetPciInfo", handle)
    if pci is not None:
        found["pci_bus_id"] = _text(getattr(pci, "busId", None))
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        memory = _maybe(nvml, "nvmlDeviceGetMemoryInfo", handle, version)
        if memory is not None and hasattr(memory, "reserved"):
            # As DCGM reads it: used excludes what the driver reserves (used + free +
            # reserved = total), so FB_USED matches dcgm-exporter's on the same GPU.
            found["memory_reserved_mb"] = int(memory.reserved) // MIB
            found["memory_used_mb"] = int(memory.used) // MIB
            found["memory_free_mb"] = int(memory.free) // MIB
    for key, fn in (
        ("enc_util_pct", "nvmlDeviceGetEncoderUtilization"),
        ("dec_util_pct", "nvmlDeviceGetDecoderUtilization"),
    ):
        answer = _maybe(nvml, fn, handle)  # [utilisation %, sampling period us]
        if answer is not None:
            found[key] = int(answer[0])
    replays = _maybe(nvml, "nvmlDeviceGetPcieReplayCounter", handle)
    if replays is not None:
        found["pcie_replays"] = int(replays)
    for key, counter in (("pcie_tx_bytes_s", 0), ("pcie_rx_bytes_s", 1)):  # NVML_PCIE_UTIL_*
        kib_s = _maybe(nvml, "nvmlDeviceGetPcieThroughput", handle, counter)
        if kib_s is not None:
            found[key] = float(kib_s) * 1024  # NVML answers KB/s (1 KB = 1024 bytes)
    rows = _maybe(nvml, "nvmlDeviceGetRemappedRows", handle)  # (corr, unc, pending, failure)
    if rows is not None:
        found["remapped_rows_correctable"] = int(rows[0])
        found["remapped_rows_uncorrectable"] = int(rows[1])
        found["row_remap_failure"] = 1 if rows[3] else 0
    fields = _field_values(nvml, handle, [FI_MEMORY_TEMP])
    if FI_MEMORY_TEMP in fields:
        found["memory_temp_c"] = int(fields[FI_MEMORY_TEMP])
    links = _field_values(
        nvml, handle, [(FI_NVLINK_RAW_TX, ALL_LINKS), (FI_NVLINK_RAW_RX, ALL_LINKS)]
    )
    if FI_NVLINK_RAW_TX in links and FI_NVLINK_RAW_RX in links:
        found["nvlink_bandwidth_total"] = int(links[FI_NVLINK_RAW_TX] + links[FI_NVLINK_RAW_RX])
    if _maybe(nvml, "nvmlDeviceGetVirtualizationMode", handle) == VIRTUALIZATION_VGPU:
        grid = _maybe(nvml, "nvmlDeviceGetGridLicensableFeatures", handle)
        if grid is not None and grid.isGridLicenseSupported and grid.licensableFeaturesCount:
            found["vgpu_license_status"] = int(grid.gridLicensableFeatures[0].featureState)
    return found


_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def _field_values(nvml: ModuleType, handle: Any, ids: list[Any]) -> dict[int, float]:
    """`nvmlDeviceGetFieldValues`: the fields this GPU answered (nvmlReturn 0), by id."""
    answer = _maybe(nvml, "nvmlDeviceGetFieldValues", handle, ids)
    found: dict[int, float] = {}
    for item in answer or []:
        try:
            if int(item.nvmlReturn) != 0:
                continue
            value = float(getattr(item.value, _VALUE_MEMBERS[int(item.valueType)]))
        except (AttributeError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            found[int(item.fieldId)] = value
    return found


class GpmWatch:
    """GPU Performance Monitoring (Hopper and newer): one GPM sample per GPU kept from the last
    read, so each read gives dcgm's DCGM_FI_PROF_* ratios (and PCIe rates) over the time since.
    Like `XidWatch`, it keeps an NVML reference of its own so the samples outlive each read's
    nvmlShutdown. Best effort: a GPU without GPM, or the first read, gives no GPM figures."""

    # NVML_GPM_METRIC_* ids: figure, id, scale to dcgm's unit.
    METRICS = (
        ("gr_engine_active", 1, 0.01),  # GRAPHICS_UTIL, % -> ratio
        ("tensor_active", 5, 0.01),  # ANY_TENSOR_UTIL
        ("dram_active", 10, 0.01),  # DRAM_BW_UTIL
        ("pcie_tx_bytes_s", 20, float(MIB)),  # PCIE_TX_PER_SEC, MiB/s -> bytes/s
        ("pcie_rx_bytes_s", 21, float(MIB)),
    )

    def __init__(self) -> None:
        self._started = False
        self._supported: dict[int, bool] = {}
        self._samples: dict[int, Any] = {}

    def start(self, nvml: ModuleType) -> bool:
        """Take the NVML reference once; False where these bindings have no GPM at all."""
        if not hasattr(nvml, "nvmlGpmSampleAlloc"):
            return False
        if not self._started:
            try:
                nvml.nvmlInit()
            except Exception:  # no driver now: try again on the next read
                return False
            self._started = True
        return True

    def figures(self, nvml: ModuleType, index: int) -> dict[str, float]:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if index not in self._supported:
                support = nvml.nvmlGpmQueryDeviceSupport(handle)
                self._supported[index] = bool(support.isSupportedDevice)
            if not self._supported[index]:
                return {}
            sample = nvml.nvmlGpmSampleAlloc()
        except Exception:
            return {}
        try:
            nvml.nvmlGpmSampleGet(handle, sample)
        except Exception:
            # Freed here, or every read of a GPU that cannot be sampled (MIG mode) would leak
            # one NVML allocation: a node scraped for weeks grows without bound.
            with contextlib.suppress(Exception):
                nvml.nvmlGpmSampleFree(sample)
            return {}
        previous, self._samples[index] = self._samples.get(index), sample
        if previous is None:
            return {}
        try:
            return self._between(nvml, previous, sample)
        except Exception:
            return {}
        finally:
            with contextlib.suppress(Exception):
                nvml.nvmlGpmSampleFree(previous)

    def _between(self, nvml: ModuleType, first: Any, second: Any) -> dict[str, float]:
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(self.METRICS)
        request.sample1, request.sample2 = first, second
        for i, (_, metric_id, _) in enumerate(self.METRICS):
            request.metrics[i].metricId = metric_id
        nvml.nvmlGpmMetricsGet(request)
        found: dict[str, float] = {}
        for i, (key, _, scale) in enumerate(self.METRICS):
            metric = request.metrics[i]
            value = float(metric.value)
            if int(metric.nvmlReturn) == 0 and math.isfinite(value):
                found[key] = value * scale
        return found


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
    wait for the one read in flight. The read runs in a thread (NVML calls block), and is waited
    for at most `timeout_s`: a GPU fallen off the bus can hang NVML for minutes, and the node
    must still start and answer (saying so) meanwhile."""

    def __init__(
        self,
        read: Callable[[], Probe] = read_nvml,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 10.0,
    ) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._timeout_s = timeout_s
        self._last: Probe | None = None
        self._at = 0.0
        self._inflight: asyncio.Future[Probe] | None = None
        self._since = 0.0  # when the read in flight started
        self.reads = 0

    async def get(self) -> Probe:
        if self._last is not None and self._clock() - self._at < self._ttl_s:
            return self._last
        if self._inflight is None:  # one read at a time, however long it hangs
            self._inflight, self._since = self._start_read(), self._clock()
        # The timeout counts from the read's start, not each caller's: once the read is known
        # hung, every caller hears so at once, within its own deadline (the fleet's, a scrape's).
        left = self._timeout_s - (self._clock() - self._since)
        if left <= 0:
            return self._stalled()
        try:
            return await asyncio.wait_for(asyncio.shield(self._inflight), left)
        except TimeoutError:
            return self._stalled()

    def _start_read(self) -> asyncio.Future[Probe]:
        # A daemon thread, not the loop's executor: a read hung in the driver must not hold
        # the node's exit (the executor's threads are joined when the loop closes).
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Probe] = loop.create_future()

        def done(probe: Probe | None, error: BaseException | None) -> None:
            self._inflight = None
            if error is not None:
                future.set_exception(error)
                return
            assert probe is not None
            self._last, self._at = probe, self._clock()
            self.reads += 1
            future.set_result(probe)

        def run() -> None:
            probe, error = None, None
            try:
                probe = self._read()
            except BaseException as exc:  # handed to the callers, as before
                error = exc
            with contextlib.suppress(RuntimeError):  # the node stopped while NVML hung
                loop.call_soon_threadsafe(done, probe, error)

        threading.Thread(target=run, name="nvml-read", daemon=True).start()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never unretrieved
        return future

    def _stalled(self) -> Probe:
        reason = (
            f"NVML did not answer within {self._timeout_s:g}s (a GPU may have fallen off the bus)"
        )
        last = self._last
        if last is None:
            return Probe(0, reason=reason, read_at=time.time())
        # Each GPU as last read, marked failing (a health check must not pass on it), without
        # its readings of the moment: an old utilisation served as current would keep driving
        # the fleet's scaling and dashboards while the GPU may be gone. Counters stay.
        stale = dict.fromkeys(MOMENTARY)
        return replace(
            last, gpus=[replace(g, error=reason, **stale) for g in last.gpus], reason=reason
        )


# What a Gpu reads at one moment (gauges, rates over the last window), as opposed to what
# identifies it or counts since boot: none of it holds once NVML stopped answering.
MOMENTARY = (
    "memory_used_mb",
    "memory_free_mb",
    "memory_reserved_mb",
    "utilization_gpu_pct",
    "utilization_memory_pct",
    "temperature_c",
    "memory_temp_c",
    "power_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "enc_util_pct",
    "dec_util_pct",
    "pcie_tx_bytes_s",
    "pcie_rx_bytes_s",
    "gr_engine_active",
    "tensor_active",
    "dram_active",
)
