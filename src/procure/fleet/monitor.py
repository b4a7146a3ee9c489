"""What the samples say about each instance: utilisation streaks over the seed's windows, the
latest figures, and anomalies with their evidence (sustained high or low, stalled, hot, XID
errors, unhealthy, unreachable). Pure: samples in, views out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from procure.fleet.settings import FleetSettings
from procure.store.fleet_tables import FleetInstanceRow, FleetSampleRow

STALL_WINDOW = timedelta(minutes=5)
STALL_MEMORY_MB = 1024  # memory held by a process that computes nothing: a stalled job


@dataclass
class InstanceView:
    instance: FleetInstanceRow
    latest: FleetSampleRow | None
    high_streak_min: float  # minutes the node has stayed above the high threshold, till now
    low_streak_min: float
    high_mean: float | None  # mean utilisation over each streak
    low_mean: float | None
    anomalies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.instance.instance_id

    def to_json(self) -> dict[str, Any]:
        i, last = self.instance, self.latest
        return {
            "instance_id": i.instance_id,
            "name": i.name,
            "instance_type": i.instance_type,
            "region": i.region,
            "ip": i.ip,
            "status": i.status,
            "price_per_hour": i.price_per_hour / 1e6,
            "launched_by": i.launched_by,
            "first_seen_at": i.first_seen_at.isoformat(),
            "latest": None
            if last is None
            else {
                "taken_at": last.taken_at.isoformat(),
                "reachable": last.reachable,
                "gpu_util": last.gpu_util,
                "temperature_c": last.temperature_c,
                "power_w": last.power_w,
                "memory_used_mb": last.memory_used_mb,
                "xid_errors": last.xid_errors,
                "gpus_failing": last.gpus_failing,
                "error": last.error,
            },
            "high_streak_min": round(self.high_streak_min, 1),
            "low_streak_min": round(self.low_streak_min, 1),
            "anomalies": self.anomalies,
        }


def streak(
    samples: Sequence[FleetSampleRow], now: datetime, ok: Any, max_gap: timedelta
) -> tuple[float, float | None]:
    """Minutes the trailing run of samples satisfying `ok` spans (to `now`), and its mean
    utilisation. A gap wider than `max_gap` (missed scans) ends the run: no evidence there."""
    first: FleetSampleRow | None = None
    utils: list[float] = []
    later = now
    for sample in reversed(samples):
        if not ok(sample) or later - sample.taken_at > max_gap:
            break
        first, later = sample, sample.taken_at
        utils.append(sample.gpu_util or 0.0)
    if first is None:
        return 0.0, None
    return (now - first.taken_at).total_seconds() / 60, sum(utils) / len(utils)


def view(
    instance: FleetInstanceRow,
    samples: Sequence[FleetSampleRow],
    cfg: FleetSettings,
    now: datetime,
) -> InstanceView:
    max_gap = timedelta(seconds=3 * cfg.scan_interval_s)
    high = streak(
        samples,
        now,
        lambda x: x.gpu_util is not None and x.gpu_util > cfg.high_gpu_threshold,
        max_gap,
    )
    low = streak(
        samples,
        now,
        lambda x: x.gpu_util is not None and x.gpu_util < cfg.low_gpu_threshold,
        max_gap,
    )
    v = InstanceView(instance, samples[-1] if samples else None, high[0], low[0], high[1], low[1])
    v.anomalies = anomalies(v, samples, cfg, now)
    return v


def anomalies(
    v: InstanceView, samples: Sequence[FleetSampleRow], cfg: FleetSettings, now: datetime
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if v.high_streak_min >= cfg.high_usage_duration_mins:
        found.append(
            {
                "kind": "sustained_high",
                "evidence": f"GPU utilisation {v.high_mean:.1f}% (> {cfg.high_gpu_threshold:g}%) "
                f"for {v.high_streak_min:.0f} min",
            }
        )
    if v.low_streak_min >= cfg.low_usage_duration_mins:
        found.append(
            {
                "kind": "sustained_low",
                "evidence": f"GPU utilisation {v.low_mean:.1f}% (< {cfg.low_gpu_threshold:g}%) "
                f"for {v.low_streak_min:.0f} min",
            }
        )
    last = v.latest
    if v.instance.status == "unhealthy":
        found.append({"kind": "unhealthy", "evidence": "the cloud reports the instance unhealthy"})
    if last is None:
        return found
    if not last.reachable:
        found.append({"kind": "unreachable", "evidence": last.error or "no answer"})
        return found
    if last.gpus_failing:
        found.append(
            {"kind": "unhealthy", "evidence": f"{last.gpus_failing} GPU(s) failing in NVML"}
        )
    recent = [x for x in samples if x.taken_at >= now - STALL_WINDOW]
    if (
        len(recent) >= 2
        and samples[0].taken_at <= now - STALL_WINDOW
        and all(x.gpu_util == 0 and (x.memory_used_mb or 0) >= STALL_MEMORY_MB for x in recent)
    ):
        found.append(
            {
                "kind": "stalled",
                "evidence": f"0% utilisation for {STALL_WINDOW.seconds // 60} min while "
                f"{last.memory_used_mb} MiB of GPU memory is held",
            }
        )
    if last.temperature_c is not None and last.temperature_c >= cfg.hot_temperature_c:
        found.append(
            {
                "kind": "hot",
                "evidence": f"{last.temperature_c:g} °C (>= {cfg.hot_temperature_c:g} °C)",
            }
        )
    xid = new_xids(samples)
    if xid is not None:
        found.append({"kind": "xid", "evidence": xid})
    return found


def new_xids(samples: Sequence[FleetSampleRow]) -> str | None:
    """The evidence of XID errors that are new at the latest sample, None when there are none.
    A node reports its XID count since it started: what is new is the rise since the previous
    sample that had a count (kept in the store, within the scan window); a count that went down
    means the node restarted, so all of it is new; with no earlier count in the window, the
    count the node reports is all there is to go on."""
    last = samples[-1] if samples else None
    if last is None or not last.xid_errors:
        return None
    before = next(
        (
            (x.taken_at, x.xid_errors or 0)
            for x in reversed(samples[:-1])
            if x.reachable and x.xid_errors is not None
        ),
        None,
    )
    if before is None:
        return f"{last.xid_errors} XID error(s) reported (no earlier count to compare with)"
    taken_at, count = before
    if last.xid_errors < count:
        fresh, since = last.xid_errors, "since the node restarted"
    else:
        fresh = last.xid_errors - count
        minutes = (last.taken_at - taken_at).total_seconds() / 60
        since = f"in {minutes:.0f} min since the previous sample"
    if fresh <= 0:
        return None
    return f"{fresh} new XID error(s) {since} ({last.xid_errors} in all since the node started)"


def views(
    instances: Sequence[FleetInstanceRow],
    samples: Sequence[FleetSampleRow],
    cfg: FleetSettings,
    now: datetime,
) -> list[InstanceView]:
    by_instance: dict[str, list[FleetSampleRow]] = {}
    for sample in samples:
        by_instance.setdefault(sample.instance_id, []).append(sample)
    return [view(i, by_instance.get(i.instance_id, []), cfg, now) for i in instances]


def lookback(cfg: FleetSettings) -> timedelta:
    """How far back the samples must go for every window."""
    longest = max(cfg.high_usage_duration_mins, cfg.low_usage_duration_mins, 5.0)
    return timedelta(minutes=longest) + timedelta(seconds=3 * cfg.scan_interval_s)
