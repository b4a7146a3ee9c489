"""Right-sizing for procure's fleet policy: a long job left alone on a big node moves to the
cheapest type that holds it or, billed by long increments, onto other nodes already paid for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from procure.clouds.base import InstanceType
from procure.fleet.billing import LONG_INCREMENT_S
from procure.fleet.monitor import InstanceView
from procure.fleet.policy import PROVISION, TERMINATE, Proposal
from procure.fleet.settings import FleetSettings

if TYPE_CHECKING:
    from procure.fleet.policies import FleetSignal

MAX_SPLIT = 4  # nodes at most that replace one


def launch(
    cfg: FleetSettings,
    price: int,
    reason: str,
    region: str | None = None,
    instance_type: str | None = None,
) -> Proposal:
    kind = instance_type or cfg.default_instance_type
    return Proposal(PROVISION, None, reason, kind, region or cfg.region, price)


def terminate(v: InstanceView, reason: str) -> Proposal:
    i = v.instance
    return Proposal(TERMINATE, v.id, reason, i.instance_type, i.region, i.price_per_hour)


def idle(v: InstanceView, cfg: FleetSettings) -> bool:
    """Active and running nothing now: below the low threshold, and below half of one GPU's
    share (a node of 8 with one busy GPU is not idle)."""
    last = v.latest
    if v.instance.status != "active" or last is None or last.gpu_util is None:
        return False
    return last.gpu_util < min(cfg.low_gpu_threshold, 50.0 / max(1, v.instance.gpus))


def place(sizes: Sequence[int], free: dict[str, int]) -> dict[str, int] | None:
    """Where jobs of `sizes` GPUs each (one node per job) go in the `free` GPUs of nodes,
    largest job first, each on the first node with room: GPUs taken per node (None: not all
    fit)."""
    room, taken = dict(free), {}
    for g in sorted(sizes, reverse=True):
        node = next((i for i, f in room.items() if f >= g), None)
        if node is None:
            return None
        room[node] -= g
        taken[node] = taken.get(node, 0) + g
    return taken


def replacement(
    sizes: Sequence[int], n: int, price: int, offers: Sequence[InstanceType]
) -> list[InstanceType]:
    """Smaller types to move a node's jobs (`sizes`, GPUs each) onto, or none. At most half of
    its `n` GPUs busy: the cheapest single type that holds them. More: several, each the
    largest type no bigger than the GPUs still to place (jobs of 1, 2, 4, 8 GPUs then fill
    them exactly), and only where they cost at most 3/4 of the node (a node of 8 running a 4-
    and a 1-GPU job for days becomes a 4 and a 1: its jobs restart from their checkpoints)."""
    busy = sum(sizes)
    if busy == 0 or not sizes:
        return []
    smaller = [t for t in offers if t.gpus < n]
    if 2 * busy <= n:
        fit = [t for t in smaller if t.gpus >= busy]
        return [min(fit, key=lambda t: (t.price_per_hour, t.gpus, t.name))] if fit else []
    by_size = sorted(smaller, key=lambda t: (-t.gpus, t.price_per_hour, t.name))
    left, plan = sorted(sizes, reverse=True), []
    while left and len(plan) < MAX_SPLIT:
        total = sum(left)
        kind = next((t for t in by_size if left[0] <= t.gpus <= total), None)
        if kind is None:
            return []
        room, rest = kind.gpus, []
        for g in left:
            if g <= room:
                room -= g
            else:
                rest.append(g)
        plan.append(kind)
        left = rest
    if left or 4 * sum(t.price_per_hour for t in plan) > 3 * price:
        return []
    return plan


def into_paid(
    v: InstanceView,
    sizes: Sequence[int],
    running: Sequence[InstanceView],
    cfg: FleetSettings,
    free: dict[str, int],
    homes: Sequence[str],
    gone: set[str],
    paid_left: Callable[[InstanceView], float],
    increment: float,
) -> dict[str, int] | None:
    """Where the jobs of `v` (`sizes`, GPUs each), a node about to renew, go with nothing
    launched: the free GPUs of `homes` (nodes in use) and of idle nodes, whose increment is paid
    already (GPUs taken per node; None: not all fit, or it is not worth it). An idle node that
    takes a job is likely renewed at its own increment's end instead of let go: the idle nodes
    woken, each counted by the share of its increment still to pay, must come to at most half of
    `v`'s GPUs, which are not renewed (the jobs restart there from their last checkpoint)."""
    idle_nodes = {
        w.id: w
        for w in running
        if w.id != v.id
        and w.id not in gone
        and idle(w, cfg)
        and free.get(w.id, 0) == w.instance.gpus
    }
    # Fullest first, as the scheduler places a job: the plan is the placement it will get.
    pool = {
        i: f
        for i, f in sorted(free.items(), key=lambda kv: kv[1])
        if i != v.id and i not in gone and (i in homes or i in idle_nodes)
    }
    target = place(sizes, pool)
    if target is None:
        return None
    woken = sum(
        w.instance.gpus * (1 - paid_left(w) / increment)
        for w in (idle_nodes.get(i) for i in target)
        if w is not None
    )
    return target if 2 * woken <= v.instance.gpus else None


def _move_out(
    node: str,
    target: dict[str, int],
    free: dict[str, int],
    leaving: set[str],
    taking: set[str],
    frag_since: dict[str, datetime],
) -> None:
    """A right-sizing scan's books once `node`'s jobs go to `target` (GPUs per node): that room
    is taken, the node leaves, the targets stay."""
    for i, g in target.items():
        free[i] -= g
    leaving.add(node)
    taking.update(target)
    frag_since.pop(node, None)


def restarts(
    node: str,
    known: bool,
    plan: Sequence[InstanceType],
    room: int,
    frag_since: dict[str, datetime],
    cfg: FleetSettings,
) -> bool:
    """Do the jobs of `node`, about to renew with GPUs to spare and nowhere paid to go, restart
    on the `plan`'s types rather than renew it? Only where the scheduler names its jobs
    (`known`: a plan for a guessed split may not hold them), where it was seen so at an earlier
    scan (one reading may catch a job between placements), and where the plan can be launched
    (the instance cap's `room`; the rails' cooldown would let one launch through per scan)."""
    if not plan or not known or node not in frag_since or room < len(plan):
        return False
    return len(plan) == 1 or cfg.action_cooldown_mins <= 0


def right_size(
    running: Sequence[InstanceView],
    cfg: FleetSettings,
    signal: FleetSignal,
    *,
    offers: Sequence[InstanceType],
    launching: int,
    left: int,
    frag_since: dict[str, datetime],
    replacing: dict[str, datetime],
    migrate_after_s: float,
    paid_left: Callable[[InstanceView], float],
    keep: set[str],
    ahead: bool = True,
) -> list[Proposal]:
    """A node with GPUs to spare for `migrate_after_s` (a long job left alone on a big node:
    durations are heavy-tailed, one that has run long will likely run longer) is replaced by
    the types of `offers` (with capacity) that `replacement` picks for its jobs: they are
    launched, and once booted the old node goes near the end of its paid increment; its jobs
    restart there from their last checkpoint. Billed by long increments, where other nodes in
    use, or idle ones still paid for, have the room (`into_paid`), the jobs move there at the end
    of the increment and nothing is launched; where they do not and no replacement could boot
    in time, the node goes at that end anyway and its replacements are launched then
    (`restarts`). Not `ahead`: billed by long increments no replacement is launched before that
    end, only then (launched ahead, it is billed a whole increment from its boot even where the
    job it was for ends first; its jobs wait a boot instead).
    `frag_since` (when each node was first seen so) and `replacing` (when its replacements were
    launched) are the caller's state, kept across scans; `keep` gets the nodes this scan's moves
    count on (the caller lets none of them go); `left` counts the instances left after this
    scan's other terminations (none goes below the minimum). Only on the scheduler's exact
    placement (`placement_known`): a utilisation estimate may hide a job."""
    out: list[Proposal] = []
    placed = dict(signal.free_gpus)
    free = dict(placed)
    step = 1.5 * cfg.scan_interval_s
    room = cfg.max_instances - len(running) - launching
    seen = set()
    long = signal.billing_increment_s >= LONG_INCREMENT_S
    # Where a moved job may go without a launch, fullest first (as the scheduler places): a node
    # in use (an idle one goes at the end of its own increment).
    homes = [
        v.id
        for v in sorted(running, key=lambda x: free.get(x.id, 0))
        if v.instance.status == "active" and free.get(v.id, 0) and not idle(v, cfg)
    ]
    leaving: set[str] = set()  # moved out this scan: no home
    taking: set[str] = set()  # a home this scan: it stays
    jobs_on = dict(signal.jobs_on)
    for v in running:
        n = v.instance.gpus
        # Its jobs now, as placed at the start of the scan (not counting those moving in).
        busy = n - placed[v.id] if v.id in placed else 0  # not placed: nothing to move
        sizes = jobs_on.get(v.id, ())
        known = sum(sizes) == busy  # the scheduler says which jobs run there
        if not known:
            sizes = (busy,)
        plan = replacement(sizes, n, v.instance.price_per_hour, offers)
        if (
            long
            and v.instance.status == "active"
            and 0 < busy < n
            and v.id not in replacing
            and v.id not in taking
            and left > cfg.min_instances
            and paid_left(v) <= step
        ):
            # It is about to renew: its jobs go where GPUs are paid for already, if they fit.
            # Not onto a node being replaced: taking a job would keep it from going.
            barred = leaving | set(replacing)
            args = (running, cfg, free, homes, barred, paid_left, signal.billing_increment_s)
            target = into_paid(v, sizes, *args)
            if target is not None:
                left -= 1
                _move_out(v.id, target, free, leaving, taking, frag_since)
                out.append(terminate(v, f"{busy} of {n} GPUs used: its jobs fit elsewhere"))
                continue
            if restarts(v.id, known, plan, room, frag_since, cfg):
                # Seen half-used before, with no replacement booted in time (its jobs came too
                # late for one): renewing would buy every free GPU for a whole increment; its
                # jobs restart on the smaller types instead, launched now (they wait one boot,
                # from their last checkpoint).
                left -= 1
                room -= len(plan)
                _move_out(v.id, {}, free, leaving, taking, frag_since)
                names = " + ".join(t.name for t in plan)
                out.append(terminate(v, f"{busy} of {n} GPUs used at renewal: {names} take them"))
                out += [
                    launch(
                        cfg,
                        t.price_per_hour,
                        f"{busy} of {n} GPUs used at renewal: {names} replace it",
                        t.regions_with_capacity[0],
                        t.name,
                    )
                    for t in plan
                ]
                continue
        if len(plan) > 1 and cfg.action_cooldown_mins > 0:
            plan = []  # the rails' cooldown would let one of its launches through per scan
        if v.instance.status != "active" or busy == 0 or not plan:
            continue
        seen.add(v.id)
        since = frag_since.setdefault(v.id, signal.now)
        if long and not ahead:
            continue  # its jobs move at its increment's end, above
        if (signal.now - since).total_seconds() < migrate_after_s:
            continue
        left_s = paid_left(v)
        started = replacing.get(v.id)
        others = {i: f for i, f in free.items() if i != v.id and i not in leaving}
        home = next(
            (i for i in homes if i not in leaving | {v.id} and free.get(i, 0) >= busy), None
        )
        if v.id in taking:
            continue  # it takes another's jobs: fuller now
        if long and started is None and home is not None:
            # Another node in use, billed anyway, holds its work: nothing to launch.
            if left_s <= step and left > cfg.min_instances:
                left -= 1
                _move_out(v.id, {home: busy}, free, leaving, taking, frag_since)
                out.append(terminate(v, f"{busy} of {n} GPUs used: its jobs fit elsewhere"))
            continue
        if started is not None and (target := place(sizes, others)) is not None:
            # Its replacements are up (or other room is): it goes at its increment's end, and
            # is never launched for again meanwhile.
            booted = (signal.now - started).total_seconds() >= signal.boot_s
            if left_s <= step and booted and left > cfg.min_instances:
                left -= 1
                replacing.pop(v.id, None)
                _move_out(v.id, target, free, leaving, taking, frag_since)
                out.append(terminate(v, f"{busy} of {n} GPUs used: moved to a smaller type"))
            continue
        stale = started is not None and (
            (signal.now - started).total_seconds() > 2 * signal.boot_s + step
        )
        # Billed by long increments, a replacement that could not boot before the old node's
        # increment ends would find it renewed: both paid a whole increment. It is launched at
        # the last scans that leave it a boot (and a scan) before that end, or in the next one.
        latest = signal.boot_s + step + (step if long else 0.0)
        soonest = signal.boot_s + step if long else 0.0
        if (started is None or stale) and soonest <= left_s <= latest and room >= len(plan):
            replacing[v.id] = signal.now
            room -= len(plan)
            names = " + ".join(t.name for t in plan)
            reason = f"{busy} of {n} GPUs used for {migrate_after_s / 60:.0f} min: {names} "
            reason += "replace it" if len(plan) > 1 else "replaces it"
            out += [
                launch(cfg, t.price_per_hour, reason, t.regions_with_capacity[0], t.name)
                for t in plan
            ]
    for gone in set(frag_since) - seen:
        frag_since.pop(gone, None)
        replacing.pop(gone, None)
    keep.update(taking)
    return out
