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
    unhealthy_since: dict[str, datetime],
) -> list[Proposal]:
    """Terminations of the fleet's own launches booting for `cfg.boot_timeout_mins`, or
    unhealthy for half of it (an instance that booted and broke: not slow, broken).
    `unhealthy_since` (kept by the caller across scans): when each was first seen unhealthy."""
    deadline = timedelta(minutes=cfg.boot_timeout_mins)
    sick = deadline / 2
    live = {v.id for v in views}
    for gone in set(unhealthy_since) - live:
        unhealthy_since.pop(gone)
    before = snapshot(views)
    out: list[Proposal] = []
    for v in views:
        row = v.instance
        if row.status != "unhealthy":
            unhealthy_since.pop(v.id, None)
        if row.launched_by is None:  # not launched by the fleet: the operator's to judge
            continue
        if row.status == "booting" and now - row.first_seen_at >= deadline:
            minutes = (now - row.first_seen_at).total_seconds() / 60
            why = f"still booting after {minutes:.0f} minutes (deadline {cfg.boot_timeout_mins:g})"
        elif row.status == "unhealthy":
            since = unhealthy_since.setdefault(v.id, now)
            if now - since < sick:
                continue
            minutes = (now - since).total_seconds() / 60
            why = f"unhealthy for {minutes:.0f} minutes (at most {sick.total_seconds() / 60:g})"
        else:
            continue
        out.append(
            Proposal(
                TERMINATE,
                v.id,
                f"Launched and {why}: it bills and does no work",
                row.instance_type,
                row.region,
                row.price_per_hour,
                before,
            )
        )
    return out
