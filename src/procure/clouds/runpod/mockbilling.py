"""The mock RunPod's `GET /v2/billing/pods`: per-pod records in time buckets (hour, day, week,
month, year) over a window given by startTime/endTime or lastN, each bucket's amount the
difference of the per-second bill at its edges, so the buckets add up to the pod's bill."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from procure.clouds.runpod.mockstate import MockRunPodState, Problem

SIZES = ("hour", "day", "week", "month", "year")


def floor(moment: datetime, size: str) -> datetime:
    moment = moment.replace(minute=0, second=0, microsecond=0)
    if size == "hour":
        return moment
    moment = moment.replace(hour=0)
    if size == "day":
        return moment
    if size == "week":
        return moment - timedelta(days=moment.weekday())
    moment = moment.replace(day=1)
    return moment if size == "month" else moment.replace(month=1)


def step(moment: datetime, size: str, n: int = 1) -> datetime:
    """`moment` (a bucket's start) moved `n` buckets (n may be negative)."""
    if size in ("hour", "day", "week"):
        return moment + n * timedelta(**{f"{size}s": 1})
    months = n if size == "month" else 12 * n
    index = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=index // 12, month=index % 12 + 1)


def _time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Problem(422, "invalid time", errors=[f"not RFC 3339: {value[:40]!r}"]) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def window(query: Mapping[str, str], now: datetime) -> tuple[str, datetime, datetime]:
    size = query.get("bucketSize", "day")
    if size not in SIZES:
        raise Problem(422, "invalid bucketSize", errors=[f"bucketSize must be one of {SIZES}"])
    last_n = query.get("lastN")
    if last_n is not None:
        if "startTime" in query or "endTime" in query:
            raise Problem(400, "lastN is mutually exclusive with startTime/endTime")
        if not last_n.isdecimal() or not 1 <= int(last_n) <= 10_000:
            raise Problem(422, "invalid lastN", errors=["lastN must be an integer ≥ 1"])
        current = floor(now, size)
        return size, step(current, size, 1 - int(last_n)), step(current, size)
    start = floor(_time(query["startTime"]) if "startTime" in query else now - timedelta(30), size)
    end = _time(query["endTime"]) if "endTime" in query else now
    if floor(end, size) != end:
        end = step(floor(end, size), size)
    return size, start, end


def pod_billing(state: MockRunPodState, query: Mapping[str, str]) -> dict[str, Any]:
    now_s = state.now()
    epoch = state.config.epoch
    now = datetime.fromtimestamp(epoch + now_s, UTC)
    size, start, end = window(query, now)
    pod_id = query.get("podId")
    pods = [p for p in state.pods.values() if pod_id is None or p.id == pod_id]
    records: list[dict[str, Any]] = []
    bucket = start
    while bucket < end and len(records) < 100_000:
        after = step(bucket, size)
        lo, hi = bucket.timestamp() - epoch, min(after.timestamp() - epoch, now_s)
        for pod in pods:
            micros = state.billed(pod, hi) - state.billed(pod, lo) if hi > lo else 0
            if micros > 0:
                amount = micros / 1e6
                records.append(
                    {
                        "startTime": _iso(bucket),
                        "endTime": _iso(after),
                        "podId": pod.id,
                        "totalAmount": amount,
                        "gpuAmount": amount,
                        "cpuAmount": 0.0,
                        "diskAmount": 0.0,
                    }
                )
        bucket = after
    total = round(sum(r["totalAmount"] for r in records), 6)
    return {
        "records": records,
        "metadata": {
            "query": {
                "startTime": _iso(start),
                "endTime": _iso(end),
                "bucketSize": size,
                "podId": pod_id,
            },
            "recordCount": len(records),
            "uniquePodCount": len({r["podId"] for r in records}),
            "totals": {
                "totalAmount": total,
                "gpuAmount": total,
                "cpuAmount": 0.0,
                "diskAmount": 0.0,
            },
        },
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
