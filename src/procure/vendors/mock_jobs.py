"""The mock vendor's jobs on a clock: progress computed from the time paid for and the time
passed (no background tasks), checkpoints, slices, expiry, and the deterministic failures."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from procure.vendors.mock_config import MockVendorConfig
from procure.vendors.protocol import VendorJob

REGRESS_AFTER = 0.1
"""A vendor lying with `progress_lie="regress"` goes back to `REGRESSED_TO` once its job-status
has shown this much: by what a poller saw, not by the clock (a slow poller sees it too), and
far enough back for a buyer's tolerance of a point or two."""
REGRESSED_TO = 0.05


@dataclass
class MockJob:
    job_id: str
    key: str
    quote: dict[str, Any]
    params: dict[str, Any]
    checkpoint_url: str | None
    will_fail: bool
    paid: bool = False
    cancelled: bool = False
    total_hours: float = 1.0  # the whole run's work, against which progress is measured
    paid_hours: float = 0.0  # the job runs until its progress has used these up
    base: float = 0.0  # progress when the current stretch of running began
    since: float | None = None  # clock time it began (None: not paid yet)
    shown: float = 0.0  # the most progress `/job-status` has reported (a regressing lie's cue)


def start_paid(job: MockJob, now: float) -> None:
    """The submission was paid: the job runs from its checkpoint for the hours quoted."""
    job.paid = True
    job.total_hours = float(job.params.get("totalHours") or job.quote["hours"])
    job.paid_hours = float(job.quote["hours"])
    job.base = progressstart_paid(job.checkpoint_url)
    job.since = now


def paid_limit(job: MockJob) -> float:
    """The progress at which the job's paid time runs out. Within a rounding error of the end is
    the end: ten slices of 0.1 h add up to 0.9999999999999999 h, and the job must complete."""
    limit = progressstart_paid(job.checkpoint_url) + job.paid_hours / job.total_hours
    return 1.0 if limit >= 1.0 - 1e-9 else limit


def progress_at(cfg: MockVendorConfig, job: MockJob, now: float) -> float:
    if job.since is None:
        return progressstart_paid(job.checkpoint_url)
    return min(paid_limit(job), 1.0, job.base + (now - job.since) / cfg.job_seconds)


def expired(cfg: MockVendorConfig, job: MockJob, now: float) -> bool:
    limit = paid_limit(job)
    if limit >= 1.0 - 1e-9 or job.since is None:
        return False
    ran_out = job.since + (limit - job.base) * cfg.job_seconds
    grace = cfg.grace_seconds if cfg.grace_seconds is not None else max(1.0, cfg.job_seconds)
    return now > ran_out + grace


def renew(cfg: MockVendorConfig, job: MockJob, hours: float, now: float) -> None:
    """A slice was paid: more hours; a job paused at its paid limit runs again from there."""
    progress = progress_at(cfg, job, now)
    if progress >= paid_limit(job) - 1e-9:
        job.base, job.since = progress, now
    job.paid_hours += hours


def fails(job_key: str, rate: float) -> bool:
    # Deterministic per job: the same submission always fails or always succeeds.
    digest = hashlib.sha256(job_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def progressstart_paid(checkpoint_url: str | None) -> float:
    if not checkpoint_url or "step=" not in checkpoint_url:
        return 0.0
    try:
        return min(0.99, float(checkpoint_url.rsplit("step=", 1)[1]))
    except ValueError:
        return 0.0


def view(cfg: MockVendorConfig, job: MockJob, now: float) -> VendorJob:
    """The job as the vendor reports it, computed from the clock: no background tasks."""
    epochs = int(job.params.get("epochs", 3))
    start = progressstart_paid(job.checkpoint_url)
    progress = progress_at(cfg, job, now)
    logs = [f"Job {job.job_id} started on {job.quote['gpuType']} at {cfg.name}"]
    if start:
        logs.append(f"Resumed from checkpoint {job.checkpoint_url}")
    failed = job.will_fail and progress >= cfg.fail_at
    if failed:
        progress = cfg.fail_at
    for epoch in range(1, epochs + 1):
        if progress + 1e-9 >= epoch / epochs and epoch / epochs > start:
            logs.append(f"Epoch {epoch}/{epochs} loss={1.5 * 0.6 ** (epoch - 1):.2f}")
    # Checkpoints at whole multiples of the job's checkpointEvery; until the first one past
    # the resumed checkpoint, that one is still the latest.
    every = float(job.params.get("checkpointEvery") or cfg.checkpoint_every)
    saved, saved_url = start, job.checkpoint_url if start else None
    n = 1
    while n * every <= progress + 1e-9 and n * every < 1 - 1e-9:
        if n * every > start + 1e-9:
            saved = n * every
            saved_url = f"https://mock-storage/{cfg.vendor_id}/{job.job_id}/ckpt?step={saved:.6f}"
        n += 1
    base = {
        "job_id": job.job_id,
        "logs": logs,
        "checkpoint_url": saved_url,
        "checkpoint_progress": round(saved, 6) if saved_url else None,
        "paid_hours": job.paid_hours,
        "amount": job.quote["amount"],
    }
    faults = cfg.faults
    if faults.huge_line_bytes:
        logs.append("x" * faults.huge_line_bytes)
    logs.extend(f"debug line {i}" for i in range(faults.extra_log_lines))
    if faults.nul_in_logs:
        logs.append("binary\x00garbage\x00")
    if faults.progress_lie == "regress" and job.shown >= REGRESS_AFTER:
        return VendorJob(status="running", progress=REGRESSED_TO, **base)
    if faults.progress_lie in ("early_complete", "stuck") and progress >= 0.3:
        if faults.progress_lie == "early_complete":
            return VendorJob(status="completed", progress=0.3, **base)
        return VendorJob(status="running", progress=0.3, **base)  # stuck
    if job.cancelled:
        return VendorJob(status="cancelled", progress=progress, **base)
    if failed:
        error = f"Vendor crashed at {round(progress * 100)}% progress"
        return VendorJob(status="failed", progress=progress, error=error, **base)
    if progress < 1.0 and expired(cfg, job, now):
        logs.append(f"Paid time ran out at {progress:.0%}; job stopped")
        return VendorJob(status="expired", progress=progress, **base)
    if progress >= 1.0:
        logs.append("Training complete; artifact uploaded")
        return VendorJob(
            status="completed",
            progress=1.0,
            metrics={"finalLoss": round(1.5 * 0.6 ** (epochs - 1), 4), "epochs": epochs},
            artifact_url=f"https://mock-storage/{cfg.vendor_id}/model-final.bin",
            **base,
        )
    return VendorJob(status="running", progress=progress, **base)
