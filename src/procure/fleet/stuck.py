"""Instances the fleet launched that will not work: one not working (booting, or unhealthy as a
RunPod pod in ERROR) past its boot deadline, or unhealthy after half of it, is terminated through
the rails like any other action; RunPod and Vast.ai bill it, and it fills the pool's minimum."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from procure.fleet.monitor import InstanceView
from procure.fleet.policy import TERMINATE, Proposal, snapshot
from procure.fleet.settings import FleetSettings

NOT_WORKING = ("booting", "unhealthy")  # billed (RunPod, Vast.ai) and doing no work


def proposals(
    views: Sequence[InstanceView],
    cfg: FleetSettings,
    now: datetime,
    since: dict[str, tuple[str, datetime]],
) -> list[Proposal]:
    """Terminations of the fleet's own launches not working (booting or unhealthy, flapping
    between them included) for `cfg.boot_timeout_mins`, or unhealthy now after half of it (one
    that booted and broke: not slow, broken). Timed from when it last stopped working (a node
    that reboots after an hour of work has a deadline of its own, not its launch's). `since`
    (kept by the caller across scans): per instance, working or not, and since when."""
    deadline = timedelta(minutes=cfg.boot_timeout_mins)
    live = {v.id for v in views}
    for gone in set(since) - live:
        since.pop(gone)
    before = snapshot(views)
    out: list[Proposal] = []
    for v in views:
        row = v.instance
        state = "idle" if row.status in NOT_WORKING else "working"
        seen = since.get(v.id)
        if seen is None or seen[0] != state:
            # First seen (a controller started) not working within a deadline of its launch:
            # timed from the launch; else from now (an old node rebooting gets its own).
            launch = seen is None and state == "idle"
            recent = now - row.first_seen_at < deadline
            since[v.id] = (state, row.first_seen_at if launch and recent else now)
        if row.launched_by is None:  # not launched by the fleet: the operator's to judge
            continue
        entered = since[v.id][1]
        limit = deadline if row.status == "booting" else deadline / 2
        if state == "working" or now - entered < limit:
            continue
        minutes = (now - entered).total_seconds() / 60
        why = f"not working ({row.status} now) for {minutes:.0f} minutes"
        out.append(
            Proposal(
                TERMINATE,
                v.id,
                f"Launched and {why} (at most {limit.total_seconds() / 60:g}): it bills and does "
                "no work",
                row.instance_type,
                row.region,
                row.price_per_hour,
                before,
            )
        )
    return out
