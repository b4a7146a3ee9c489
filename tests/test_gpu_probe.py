"""The NVML probe: figures per GPU from a fake NVML module, a plain answer without a driver, one
failing GPU that does not hide the others, and a cache that reads NVML once per interval."""

from __future__ import annotations

import asyncio

import pytest

from gpu_fakes import FakeGpu, FakeNvml, two_gpus
from procure.gpu import probe as probe_module
from procure.gpu.probe import CachedProbe, read_nvml


def test_every_gpu_is_read_with_its_figures() -> None:
    probe = read_nvml(FakeNvml(two_gpus()).module())
    assert probe.gpu_count == 2 and probe.reason is None
    assert probe.driver_version == "550.54.15"
    first, second = probe.gpus
    assert first.name == "NVIDIA H100 80GB HBM3"  # bytes from older bindings, decoded
    assert (first.uuid, second.uuid) == ("GPU-aaaa", "GPU-bbbb")
    assert (first.memory_used_mb, first.memory_total_mb) == (6321, 81559)
    assert first.memory_free_mb == 81559 - 6321
    assert (first.utilization_gpu_pct, first.utilization_memory_pct) == (37, 12)
    assert (second.utilization_gpu_pct, second.temperature_c) == (90, 71)
    assert (first.power_w, first.power_limit_w) == (123.456, 700.0)  # milliwatts to watts
    assert (first.sm_clock_mhz, first.mem_clock_mhz, first.energy_mj) == (1980, 2619, 987_654_321)
    assert first.error is None and second.error is None


def test_a_failing_gpu_does_not_hide_the_others() -> None:
    gpus = [*two_gpus(), FakeGpu(uuid="GPU-cccc", fails="NVMLError_GpuIsLost")]
    gpus.insert(0, FakeGpu(uuid="GPU-zzzz", fails="NVMLError_Unknown"))
    probe = read_nvml(FakeNvml(gpus).module())
    assert probe.gpu_count == 4
    assert [g.error is None for g in probe.gpus] == [False, True, True, False]
    assert "GPU is lost" in (probe.gpus[3].error or "")
    assert probe.gpus[3].uuid == "GPU-cccc"  # what was read before the failure is kept
    assert probe.gpus[1].memory_used_mb == 6321


def test_an_unsupported_figure_is_missing_not_an_error() -> None:
    probe = read_nvml(FakeNvml([FakeGpu(power_supported=False)]).module())
    gpu = probe.gpus[0]
    assert gpu.error is None and gpu.power_w is None and gpu.memory_used_mb == 6321


@pytest.mark.parametrize(
    ("init_error", "says"),
    [
        ("NVMLError_LibraryNotFound", "no NVIDIA driver found"),
        ("NVMLError_DriverNotLoaded", "no NVIDIA driver loaded"),
        ("NVMLError_Unknown", "NVML could not start"),
    ],
)
def test_no_driver_is_a_plain_answer(init_error: str, says: str) -> None:
    probe = read_nvml(FakeNvml(two_gpus(), init_error=init_error).module())
    assert probe.gpu_count == 0 and probe.gpus == []
    assert probe.reason is not None and says in probe.reason


def test_no_nvidia_ml_py_is_a_plain_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_module, "load_nvml", lambda: None)
    probe = read_nvml()
    assert probe.gpu_count == 0 and "nvidia-ml-py is not installed" in (probe.reason or "")


def test_the_real_library_never_raises() -> None:
    # Here (no GPU) this is the real "no driver" path; on a GPU machine it reads real figures.
    probe = read_nvml()
    assert probe.gpu_count >= 0
    assert probe.gpu_count > 0 or probe.reason
    assert len(probe.gpus) == probe.gpu_count


def test_a_driver_without_gpus_says_so() -> None:
    probe = read_nvml(FakeNvml([]).module())
    assert probe.gpu_count == 0 and "reports no GPU" in (probe.reason or "")


def test_the_cache_reads_nvml_once_per_interval_however_many_ask() -> None:
    nvml = FakeNvml(two_gpus())
    module = nvml.module()
    now = [100.0]
    cache = CachedProbe(lambda: read_nvml(module), ttl_s=2.0, clock=lambda: now[0])

    async def scenario() -> None:
        answers = await asyncio.gather(*(cache.get() for _ in range(50)))
        assert nvml.reads == 1 and all(a is answers[0] for a in answers)
        now[0] += 1.0
        await asyncio.gather(*(cache.get() for _ in range(50)))
        assert nvml.reads == 1  # still fresh
        now[0] += 1.5
        await asyncio.gather(*(cache.get() for _ in range(50)))
        assert nvml.reads == 2

    asyncio.run(scenario())


def test_the_gpu_package_imports_no_agent_fleet_api_or_web() -> None:
    import ast
    from pathlib import Path

    import procure.gpu

    banned = ("procure.agent", "procure.fleet", "procure.api", "procure.web")
    for path in Path(procure.gpu.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.startswith(banned)], path.name
