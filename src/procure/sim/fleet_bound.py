"""A computed lower bound on the fleet benchmark's cost billed by whole increments, for every
policy (clairvoyant ones included) whose jobs start within a given wait and run to their end."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from procure.clouds.mockworld.workload import JobSpec
from procure.sim.fleet_world import CATALOGUE, World, work_floor_usd

Run = tuple[float, float, int]  # [start, end) on `gpus` GPUs


def cover_blocks(runs: Sequence[Run], increment: float) -> int:
    """The fewest single-GPU blocks [s, s + increment) such that at every moment at least as many
    blocks are live as the runs then hold GPUs. Exact: sweep time and, at each moment t_k more
    GPUs are busy than blocks are live, open the missing n_k blocks there. Any cover has at
    least N_k = n_1 + ... + n_k blocks starting at or before t_k: those live at t_k started in
    (t_k - increment, t_k] and are at least as many as the sweep's that did (it opened just
    enough), and by induction at least N_j started at or before the last t_j <= t_k - increment.
    So no cover has fewer blocks than the sweep opened."""
    events: list[tuple[float, int]] = []
    for start, end, gpus in runs:
        if end > start and gpus > 0:
            events += [(start, gpus), (end, -gpus)]
    events.sort()
    ends: list[tuple[float, int]] = []  # (end, blocks) of the blocks opened that are live
    live = level = blocks = i = 0
    while i < len(events):
        at = min(events[i][0], ends[0][0]) if ends else events[i][0]
        while i < len(events) and events[i][0] == at:
            level += events[i][1]
            i += 1
        while ends and ends[0][0] <= at:  # a block [s, s + increment) is gone at its end
            live -= heapq.heappop(ends)[1]
        if live < level:
            heapq.heappush(ends, (at + increment, level - live))
            blocks += level - live
            live = level
    return blocks


def mandatory_runs(jobs: Sequence[JobSpec], max_wait_s: float, first_s: float) -> list[Run]:
    """The part of each job that runs whatever its start, when it starts at most `max_wait_s`
    after it first can (its submission, or `first_s`, when the first GPU can be up, if later)
    and runs without a break: [first + wait, first + duration)."""
    out: list[Run] = []
    for j in jobs:
        first = max(j.submit_s, first_s)
        if j.duration_s > max_wait_s:
            out.append((first + max_wait_s, first + j.duration_s, j.gpus))
    return out


def hour_bound_usd(jobs: Sequence[JobSpec], world: World, max_wait_s: float = 0.0) -> float:
    """What any policy pays at least if each job starts within `max_wait_s` of when it first can
    and runs to its end without a break (no failure, no move). The exact optimum of a relaxation:
    any GPU at the cheapest price per GPU, jobs moving freely between GPUs, no boot billed (a
    GPU can be up from `world.boot_s`), GPUs bought in whole billing increments; only the part of
    each job that runs whatever its start (`mandatory_runs`) must have a GPU at each moment,
    and the blocks bought must hold all the work. Never below the floor (`work_floor_usd`)."""
    if not jobs:
        return 0.0
    per_gpu_h = min(o.usd_per_hour / o.gpus for o in CATALOGUE)
    step = world.billing_s
    covered = cover_blocks(mandatory_runs(jobs, max_wait_s, world.boot_s), step)
    work_s = sum(j.gpus * j.duration_s for j in jobs)
    # Beyond the mandatory parts the relaxation places work anywhere: blocks enough to hold it.
    blocks = max(covered, math.ceil(work_s / step - 1e-9))
    return max(blocks * step / 3600 * per_gpu_h, work_floor_usd(jobs, world))


def longest_wait_above(
    jobs: Sequence[JobSpec], world: World, ratio: float, resolution_s: float = 1.0
) -> float | None:
    """The longest `max_wait_s` (to `resolution_s`, within an hour) at which `hour_bound_usd`
    is still above `ratio` times the floor: any policy whose jobs wait no longer pays more than
    that (None: not even at no wait). The bound never rises as the wait grows."""
    target = ratio * work_floor_usd(jobs, world)
    if hour_bound_usd(jobs, world, 0.0) <= target:
        return None
    low, high = 0.0, 3600.0
    if hour_bound_usd(jobs, world, high) > target:
        return high
    while high - low > resolution_s:
        mid = (low + high) / 2
        low, high = (mid, high) if hour_bound_usd(jobs, world, mid) > target else (low, mid)
    return low
