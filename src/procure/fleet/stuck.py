"""Instances the fleet launched that will not work: one still booting past its boot deadline, or
one unhealthy (RunPod's ERROR) for half that, is terminated through the rails like any other
action; RunPod and Vast.ai bill both, and both fill the pool's minimum while doing nothing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from procure.fleet.monitor import InstanceView
from procure.fleet.policy import TERMINATE, Proposal, snapshot
from procure.fleet.settings import FleetSettings


def proposals(
    views: Sequence[InstanceView],
    cfg: FleetSettings,
    now: datetime,
    since: dict[str, tuple[str, datetime]],
) -> list[Proposal]:
    """Terminations of the fleet's own launches booting for `cfg.boot_timeout_mins`, or
    unhealthy for half of it (an instance that booted and broke: not slow, broken), each timed
    from when it entered that state (a node that reboots after an hour of work has its own
    deadline, not its launch's). `since` (kept by the caller across scans): each instance's
    status and since when."""
    deadline = timedelta(minutes=cfg.boot_timeout_mins)
    live = {v.id for v in views}
    for gone in set(since) - live:
        since.pop(gone)
    before = snapshot(views)
    out: list[Proposal] = []
    for v in views:
        row = v.instance
        seen = since.get(v.id)
        if seen is None or seen[0] != row.status:
            # First seen (a controller started) booting within a deadline of its launch: timed
            # from the launch; else from now (an old node rebooting gets a deadline of its own).
            launch = seen is None and row.status == "booting"
            recent = now - row.first_seen_at < deadline
            since[v.id] = (row.status, row.first_seen_at if launch and recent else now)
        if row.launched_by is None:  # not launched by the fleet: the operator's to judge
            continue
        entered = since[v.id][1]
        limit = deadline if row.status == "booting" else deadline / 2
        if row.status not in ("booting", "unhealthy") or now - entered < limit:
            continue
        minutes = (now - entered).total_seconds() / 60
        why = (
            f"still booting after {minutes:.0f} minutes"
            if row.status == "booting"
            else f"unhealthy for {minutes:.0f} minutes"
        )
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
