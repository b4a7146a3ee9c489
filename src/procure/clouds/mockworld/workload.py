"""Fleet workloads: jobs of (submit_s, gpus, duration_s), from a CSV file or a seeded synthetic
generator (a diurnal load plus bursts). Bounded: a workload from outside cannot exhaust memory."""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

MAX_JOBS = 100_000
MAX_CSV_BYTES = 8 << 20
MAX_GPUS_PER_JOB = 64
MAX_DURATION_S = 30 * 86_400.0
DAY_S = 86_400.0


class WorkloadError(ValueError):
    """A workload that cannot be used (says which line and why)."""


@dataclass(frozen=True)
class JobSpec:
    submit_s: float  # seconds after the workload starts
    gpus: int
    duration_s: float  # GPU time the job needs once placed


def parse_csv(text: str, *, max_jobs: int = MAX_JOBS) -> list[JobSpec]:
    """Jobs from `submit_s,gpus,duration_s` lines (a header line, blank lines and `#` comments
    are skipped), sorted by submission time."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CSV_BYTES:
        raise WorkloadError(f"workload larger than {MAX_CSV_BYTES:,} bytes")
    jobs: list[JobSpec] = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and cells[0].lower() == "submit_s":
            continue
        if len(cells) != 3:
            raise WorkloadError(f"line {number}: expected submit_s,gpus,duration_s")
        jobs.append(_job(number, *cells))
        if len(jobs) > max_jobs:
            raise WorkloadError(f"more than {max_jobs:,} jobs")
    return sorted(jobs, key=lambda j: j.submit_s)


def load_csv(path: Path, *, max_jobs: int = MAX_JOBS) -> list[JobSpec]:
    with path.open("rb") as f:
        raw = f.read(MAX_CSV_BYTES + 1)
    if len(raw) > MAX_CSV_BYTES:
        raise WorkloadError(f"{path}: larger than {MAX_CSV_BYTES:,} bytes")
    return parse_csv(raw.decode("utf-8", "replace"), max_jobs=max_jobs)


def _job(number: int, submit: str, gpus: str, duration: str) -> JobSpec:
    try:
        submit_s, duration_s, count = float(submit), float(duration), int(gpus)
    except ValueError:
        found = f"{submit!r}, {gpus!r}, {duration!r}"
        raise WorkloadError(f"line {number}: not numbers: {found}") from None
    if not (math.isfinite(submit_s) and 0 <= submit_s <= 365 * DAY_S):
        raise WorkloadError(f"line {number}: submit_s must be between 0 and a year")
    if not 1 <= count <= MAX_GPUS_PER_JOB:
        raise WorkloadError(f"line {number}: gpus must be between 1 and {MAX_GPUS_PER_JOB}")
    if not (math.isfinite(duration_s) and 0 < duration_s <= MAX_DURATION_S):
        raise WorkloadError(f"line {number}: duration_s must be above 0 and at most 30 days")
    return JobSpec(submit_s, count, duration_s)


def to_csv(jobs: list[JobSpec]) -> str:
    lines = ["submit_s,gpus,duration_s"]
    lines += [f"{j.submit_s:.3f},{j.gpus},{j.duration_s:.3f}" for j in jobs]
    return "\n".join(lines) + "\n"


def synthetic(
    seed: int,
    *,
    hours: float = 24.0,
    jobs_per_hour: float = 12.0,
    diurnal_amplitude: float = 0.6,
    peak_hour: float = 14.0,
    bursts: int = 2,
    burst_jobs: int = 30,
    burst_minutes: float = 20.0,
    mean_duration_s: float = 1800.0,
    multi_gpu_share: float = 0.0,
    gpu_weights: dict[int, float] | None = None,
    duration_sigma: float = 0.8,
    min_duration_s: float = 60.0,
    max_duration_s: float = 6 * 3600.0,
) -> list[JobSpec]:
    """A seeded day of work: Poisson arrivals whose rate follows the day (`jobs_per_hour` on
    average, ± `diurnal_amplitude`, highest at `peak_hour`), plus `bursts` bursts of
    `burst_jobs` jobs each arriving within `burst_minutes`. Durations are log-normal around
    `mean_duration_s` with spread `duration_sigma`, clipped to [`min_duration_s`,
    `max_duration_s`] (1 min to 6 h by default; a wide sigma and a cap of days give the heavy
    tail of real clusters). A share of jobs want 2 GPUs (none by default, so every job fits a
    1-GPU instance), or, with `gpu_weights`, each job's GPU count is drawn from those weights."""
    if not (0 < hours <= 24 * 30 and jobs_per_hour >= 0 and 0 <= diurnal_amplitude <= 1):
        raise WorkloadError("hours in (0, 720], jobs_per_hour >= 0, amplitude in [0, 1]")
    rng = random.Random(seed)
    horizon = hours * 3600.0
    peak_rate = jobs_per_hour * (1 + diurnal_amplitude) / 3600.0
    jobs: list[JobSpec] = []

    def rate(t: float) -> float:
        phase = 2 * math.pi * ((t / 3600.0 - peak_hour) / 24.0)
        return jobs_per_hour * (1 + diurnal_amplitude * math.cos(phase)) / 3600.0

    def job(at: float) -> JobSpec:
        sigma = duration_sigma
        mu = math.log(mean_duration_s) - sigma**2 / 2
        duration = min(max(rng.lognormvariate(mu, sigma), min_duration_s), max_duration_s)
        if gpu_weights:
            gpus = rng.choices(list(gpu_weights), weights=list(gpu_weights.values()))[0]
        else:
            gpus = 2 if rng.random() < multi_gpu_share else 1
        return JobSpec(round(at, 3), gpus, round(duration, 3))

    t = 0.0
    # Thinning (Lewis-Shedler): candidates at the peak rate, kept with rate(t)/peak.
    while peak_rate > 0:
        t += rng.expovariate(peak_rate)
        if t >= horizon or len(jobs) >= MAX_JOBS:
            break
        if rng.random() < rate(t) / peak_rate:
            jobs.append(job(t))
    for _ in range(bursts):
        start = rng.uniform(0, max(0.0, horizon - burst_minutes * 60))
        for _ in range(burst_jobs):
            if len(jobs) < MAX_JOBS:
                jobs.append(job(start + rng.uniform(0, burst_minutes * 60)))
    return sorted(jobs, key=lambda j: j.submit_s)
