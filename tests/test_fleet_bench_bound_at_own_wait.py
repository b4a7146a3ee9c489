"""The fleet benchmark says what its per-hour bound proves at the waits procure's default
actually had: at its own longest wait, not only at no wait (where the bound is far above the
floor, and says nothing about a policy whose jobs wait half an hour)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from procure.clouds.mockworld.workload import JobSpec
from procure.sim.fleet_world import World, work_floor_usd
from test_fleet_bench_fairness import _row

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fleet as fb


def test_the_bound_is_given_at_the_default_s_own_longest_wait_by_the_hour_only() -> None:
    """Twelve lone 5-min jobs two hours apart: a default whose jobs waited at most a minute pays
    at least an hour for each (12x the floor); one whose jobs waited 5 min is bounded by the
    floor alone. Billed by the minute the line is not printed (the bound is the floor)."""
    jobs = [JobSpec(7200.0 * k, 1, 300.0) for k in range(1, 13)]
    floors = {"a": work_floor_usd(jobs, World())}
    workloads = [("a", 1, jobs)]

    def lines(wait_s: float, billing: str = "hour") -> list[str]:
        row = replace(_row("a", "procure", 20.0, 1.0), billing=billing, wait_max_s=wait_s)
        peer = replace(row, policy="cluster-autoscaler")
        return fb.own_wait_lines([peer, row], workloads, floors)

    assert lines(60.0) == ["  bound a at the default's own longest wait (1.0 min): 12.000 × floor"]
    assert lines(300.0) == ["  bound a at the default's own longest wait (5.0 min): 1.000 × floor"]
    assert lines(60.0, billing="minute") == []
