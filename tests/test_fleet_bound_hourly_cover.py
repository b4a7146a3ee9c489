"""The fleet benchmark's bound billed by whole increments: the cover is exact (brute force on tiny
cases), the bound is never above the best schedule its class allows, nor above a policy played
in the simulator whose jobs waited no longer and ran unbroken."""

from __future__ import annotations

import itertools
import random
import sys
from dataclasses import replace
from pathlib import Path

from procure.clouds.mockworld.workload import JobSpec, synthetic
from procure.fleet.policies import ProcurePolicy, static
from procure.sim.fleet_bound import cover_blocks, hour_bound_usd, longest_wait_above
from procure.sim.fleet_peers import ClusterAutoscaler, navarch_queue
from procure.sim.fleet_world import CATALOGUE, Result, World, run, work_floor_usd
from test_fleet_bench_fairness import _row

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fleet as fb

PER_GPU_H = min(o.usd_per_hour / o.gpus for o in CATALOGUE)


def brute_cover(runs: list[tuple[int, int, int]], increment: int) -> int:
    """The fewest blocks, by a search over every count of blocks starting at each integer time
    (integer starts suffice when runs start and end at integers), cut where a time is left
    short or the count reaches the best found."""
    horizon = max(e for _, e, _ in runs)
    demand = [sum(g for s, e, g in runs if s <= t < e) for t in range(horizon)]
    starts = list(range(-increment + 1, horizon))
    best = [sum(demand)]  # one block per busy GPU and time unit always covers

    def go(counts: list[int]) -> None:
        if sum(counts) >= best[0]:
            return
        if len(counts) == len(starts):
            best[0] = sum(counts)
            return
        at = starts[len(counts)]
        for n in range(max(demand) + 1):
            chosen = [*counts, n]
            live = sum(c for c, s in zip(chosen, starts, strict=False) if s > at - increment)
            if at >= 0 and live < demand[at]:
                continue
            go(chosen)

    go([])
    return best[0]


def test_a_lone_short_job_pays_a_whole_hour_and_two_in_one_hour_share_it() -> None:
    assert cover_blocks([(1000.0, 1300.0, 1)], 3600.0) == 1
    # Back to back on one GPU within an hour: one block; a third past its end: a second.
    assert cover_blocks([(0.0, 1800.0, 1), (1800.0, 3600.0, 1)], 3600.0) == 1
    assert cover_blocks([(0.0, 1800.0, 1), (1800.0, 3600.0, 1), (3600.0, 3660.0, 1)], 3600.0) == 2
    # Two at once on 4 GPUs, one of them for 90 min: 4 blocks, then 2 more for its last 30 min.
    assert cover_blocks([(0.0, 600.0, 2), (0.0, 5400.0, 2)], 3600.0) == 6
    world = World(billing_s=3600.0)
    job = [JobSpec(1000.0, 1, 300.0)]
    assert hour_bound_usd(job, world) == PER_GPU_H
    # Billed by the second, the bound is the floor.
    assert hour_bound_usd(job, World(billing_s=1.0)) == work_floor_usd(job, world)


def test_the_cover_is_the_fewest_blocks_on_every_tiny_case() -> None:
    rng = random.Random(7)
    for _ in range(150):
        runs = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randint(0, 5)
            runs.append((start, start + rng.randint(1, 4), rng.randint(1, 2)))
        increment = rng.randint(1, 4)
        floats = [(float(s), float(e), g) for s, e, g in runs]
        assert cover_blocks(floats, float(increment)) == brute_cover(runs, increment), runs


def test_the_bound_is_never_above_the_best_schedule_its_waits_allow() -> None:
    """Brute force over every integer start within the wait: the cheapest cover of the GPUs
    busy is what a clairvoyant policy with free moves pays; the bound is at most that, and
    equal to it with no wait (where nothing is relaxed but the boot and the moves)."""
    rng = random.Random(11)
    increment = 3
    world = World(billing_s=float(increment), boot_s=0.0)
    for _ in range(120):
        jobs = [
            JobSpec(float(rng.randint(0, 5)), rng.randint(1, 2), float(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        wait = rng.randint(0, 3)
        # The cover is exact (the test above): the cheapest schedule is the cheapest cover.
        best = min(
            cover_blocks(
                [
                    (j.submit_s + d, j.submit_s + j.duration_s + d, j.gpus)
                    for j, d in zip(jobs, delays, strict=True)
                ],
                float(increment),
            )
            for delays in itertools.product(range(wait + 1), repeat=len(jobs))
        )
        bound = hour_bound_usd(jobs, world, float(wait))
        paid = best * increment / 3600 * PER_GPU_H
        assert bound <= paid + 1e-9, (jobs, wait)
        if wait == 0:
            assert abs(bound - paid) < 1e-9, jobs


def test_no_policy_played_pays_less_than_the_bound_at_its_own_longest_wait() -> None:
    """Every policy played by the hour with no failures, on days whose first job comes after
    an hour (a fleet started at once is up by then, so a static one's jobs need not wait):
    where no job was put back in the queue, the bound at that run's longest wait is at most
    what the run paid; the floor is at most what every run paid."""
    world = World(billing_s=3600.0, failures_per_gpu_hour=0.0)
    checked = at_no_wait = 0
    for seed, profile in ((1, "diurnal"), (2, "saturated")):
        day = synthetic(seed, hours=4.0, **fb.PROFILES[profile])
        jobs = [JobSpec(j.submit_s + 3600.0, j.gpus, j.duration_s) for j in day]
        policies = [
            ("static", static(fb.static_size(jobs, world)), fb.settings("static-peak"), False),
            ("navarch-queue", navarch_queue, fb.settings("navarch-queue"), True),
            (
                "cluster-autoscaler",
                ClusterAutoscaler(seed=seed),
                fb.settings("cluster-autoscaler"),
                False,
            ),
            *(
                (
                    f"procure@{m}",
                    ProcurePolicy(target_wait_s=m * 60.0),
                    fb.settings("procure"),
                    False,
                )
                for m in (0.0, 5.0, 30.0, 120.0)
            ),
        ]
        for name, decide, cfg, one in policies:
            r = run(name, decide, cfg, jobs, "t", world, hours=5.0, one_cooldown=one)
            assert r.completed == r.jobs, r
            assert work_floor_usd(jobs, world) <= r.cost_usd + 1e-6, r
            if r.restarts == 0:
                checked += 1
                at_no_wait += r.wait_max_s == 0.0
                assert hour_bound_usd(jobs, world, r.wait_max_s) <= r.cost_usd + 1e-6, r
    assert checked >= 4 and at_no_wait >= 1


def test_the_wait_up_to_which_the_goal_is_out_of_reach() -> None:
    """Twelve lone 5-min jobs two hours apart: with no wait each pays an hour (12x the floor);
    once each may wait its whole length nothing of it must run at a given moment, and the
    bound is the hour all twelve hold together (the floor)."""
    world = World(billing_s=3600.0)
    jobs = [JobSpec(7200.0 * k, 1, 300.0) for k in range(1, 13)]
    assert abs(hour_bound_usd(jobs, world) / work_floor_usd(jobs, world) - 12.0) < 1e-9
    assert hour_bound_usd(jobs, world, 300.0) == work_floor_usd(jobs, world)
    reach = longest_wait_above(jobs, world, 1.15)
    assert reach is not None and 299.0 <= reach < 300.0
    # Billed by the second nothing is above the floor: no wait makes the goal out of reach.
    assert longest_wait_above(jobs, World(billing_s=1.0), 1.10) is None


def test_the_benchmark_prints_the_bound_beside_the_floor_and_in_json(capsys) -> None:
    args = ["--profile", "diurnal", "--seeds", "1", "--hours", "3", "--billing", "hour"]
    args += ["--targets", "30", "--workers", "1"]
    fb.main(args)
    text = capsys.readouterr().out
    assert "bound diurnal 1: floor $" in text and "× that bound" in text
    assert "bound: ≤ 1.15 × floor is out of reach on" in text
    fb.main([*args, "--json"])
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(r["bound_usd"] >= r["floor_usd"] > 0 for r in rows)
    assert all({"cost_usd", "x_floor", "p95_wait_min"} <= set(r) for r in rows)


def _default(cost: float, wait_min: float, restarts: int = 0) -> Result:
    row = _row("a", "procure", cost, wait_min)
    return replace(row, billing="hour", wait_max_s=wait_min * 60, restarts=restarts)


def test_the_goal_is_out_of_reach_only_where_the_bound_covers_the_defaults_own_waits() -> None:
    """Floor $100, bound $130 with no wait, above 1.15 x the floor for waits up to 4 min."""
    floors, bounds = {"a": 100.0}, {("a", "hour"): (130.0, 240.0)}

    def verdict(row: Result) -> str:
        return fb.bound_lines([row], floors, bounds, "hour")[-1]

    assert verdict(_default(110.0, 30.0)).endswith(": met")
    # Waited 30 min: the bound says nothing about it, the miss stands.
    assert verdict(_default(131.0, 30.0)).endswith("MISSED, not proven out of reach")
    # Waited no longer than 4 min and nothing put back: out of reach, and within 2 % of it.
    assert verdict(_default(131.0, 3.0)).endswith("out of reach, procure within 2 % of the bound")
    assert verdict(_default(140.0, 3.0)).endswith("MISSED, not proven out of reach")
    assert verdict(_default(131.0, 3.0, restarts=1)).endswith("MISSED, not proven out of reach")
