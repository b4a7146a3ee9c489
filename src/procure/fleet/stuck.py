"""Instances the fleet launched that will not work: one not working (booting, active with a node
that does not answer or reads no GPU, or unhealthy as a RunPod pod in ERROR) past its boot
deadline, or unhealthy after half of it, is terminated through the rails like any other action;
the cloud bills it, and it fills the pool's minimum (and, silent, holds back every scale-up)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from procure.fleet import nodes
from procure.fleet.monitor import InstanceView
from procure.fleet.policy import TERMINATE, Proposal, snapshot
from procure.fleet.settings import FleetSettings

NOT_WORKING = ("booting", "unhealthy")  # billed (RunPod, Vast.ai) and doing no work


def silent(v: InstanceView, now: datetime) -> bool:
    """Active, but its node did not answer this scan: its node process died or never started.
    A node that refuses the fleet's token runs: ending it for a wrong setting would end the pool
    and its replacements, one boot timeout after another."""
    last = v.latest
    return (
        v.instance.status == "active"
        and last is not None
        and last.taken_at >= now
        and not last.reachable
        and not nodes.refused(last.error)
    )


def gpuless(v: InstanceView, now: datetime) -> bool:
    """Active, its node answered this scan, but it reads no GPU: each one it has fails in NVML
    (a GPU fallen off the bus, NVML hung) or it finds none (no driver loaded). It bills as a
    GPU and computes nothing, like a silent node. One GPU still read gives a utilisation; a GPU
    that reports none (MIG) fails on nothing: neither is judged so."""
    last = v.latest
    return (
        v.instance.status == "active"
        and last is not None
        and last.taken_at >= now
        and last.reachable
        and last.gpu_util is None
        and (bool(last.gpus_failing) or last.error is not None)
    )


def proposals(
    views: Sequence[InstanceView],
    cfg: FleetSettings,
    now: datetime,
    since: dict[str, tuple[str, datetime]],
    *,
    judge_silence: bool = True,
    answered: Mapping[str, datetime] | None = None,
) -> list[Proposal]:
    """Terminations of the fleet's own launches not working (booting, silent while active, or
    unhealthy, flapping between them included) for `cfg.boot_timeout_mins`, or unhealthy now
    after half of it (one that booted and broke: not slow, broken). Timed from when it last
    stopped working (a node that reboots after an hour of work has a deadline of its own, not its
    launch's). `since` (kept by the caller across scans): per instance, working or not, and since
    when. `answered`: per instance, when its node last answered (the store's samples): how a
    process that has not watched it yet times it. `judge_silence`: False when a silent node
    says nothing of the instance (the figures came from Prometheus). Each termination passes
    the rails, whose cooldown paces them: a controller cut off from every node ends one
    instance per cooldown, not the pool at once."""
    deadline = timedelta(minutes=cfg.boot_timeout_mins)
    live = {v.id for v in views}
    for gone in set(since) - live:
        since.pop(gone)
    before = snapshot(views)
    out: list[Proposal] = []
    for v in views:
        row = v.instance
        idle = row.status in NOT_WORKING or (judge_silence and (silent(v, now) or gpuless(v, now)))
        state = "idle" if idle else "working"
        seen = since.get(v.id)
        if seen is None or seen[0] != state:
            start = now
            if seen is None and state == "idle":
                # Not watched by this process yet (a controller started, or `fleet run --once`
                # from a scheduler: a new process each scan): not working since its node last
                # answered (an old node rebooting gets its own deadline), else since its launch.
                start = max(row.first_seen_at, (answered or {}).get(v.id, row.first_seen_at))
            since[v.id] = (state, start)
        if row.launched_by is None:  # not launched by the fleet: the operator's to judge
            continue
        entered = since[v.id][1]
        # A node may start a while after the cloud shows it active: silent gets the boot's time.
        limit = deadline / 2 if row.status == "unhealthy" else deadline
        if state == "working" or now - entered < limit:
            continue
        minutes = (now - entered).total_seconds() / 60
        what = row.status
        if row.status == "active":
            what = "active, its GPUs unread" if gpuless(v, now) else "active, its node silent"
        why = f"not working ({what} now) for {minutes:.0f} minutes"
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
