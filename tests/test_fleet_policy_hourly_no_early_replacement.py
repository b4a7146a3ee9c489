"""procure's fleet policy billed by the hour, at its default queue-wait target: a node with GPUs
to spare gets no replacement launched ahead of its hour's end (it would be billed a whole hour
from its boot, even where the job it was for ends first); the job moves, if it still runs, at
that end, and waits a boot there, which the target leaves room for."""

from __future__ import annotations

from datetime import timedelta

from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.policies import ProcurePolicy
from procure.fleet.policy import PROVISION, TERMINATE
from procure.sim.fleet_world import World, run
from test_fleet_hourly_restarts_at_renewal import BOOT, PRICE, T0, cfg, scan


def launched(increment: float, target_s: float = 1800.0) -> list[list[str]]:
    """The types launched at each of three scans of an 8-GPU node running one 1-GPU job: 25, 12
    and 0.5 minutes before its increment ends (a replacement launched at the second would boot 2
    minutes before that end)."""
    p = ProcurePolicy(target_wait_s=target_s, migrate_after_s=600)
    out = []
    for left_s in (1500.0, BOOT + 120, 30.0):
        acts = scan(p, T0 + timedelta(seconds=1500 - left_s), left_s, increment)
        goes = ["8x goes"] if any(kind == TERMINATE for kind, _, _ in acts) else []
        out.append([t or "" for kind, _, t in acts if kind == PROVISION] + goes)
    return out


def test_billed_by_the_hour_no_replacement_is_launched_before_the_hour_ends() -> None:
    """Before the fix: a 1-GPU node was launched 12 minutes before the 8-GPU node's hour ended,
    billed a whole hour from its boot whether or not the job it was for still ran by then."""
    # Nothing bought ahead; at the hour's last scan the 8 goes and the job's 1-GPU node is
    # launched (the job restarts there, a boot later, from its checkpoint).
    assert launched(3600.0) == [[], [], ["gpu_1x_a100", "8x goes"]]
    # A 10-minute target leaves no room for a boot's wait at the hour's end: the replacement is
    # launched to boot just before it, as before.
    assert launched(3600.0, target_s=600.0)[1] == ["gpu_1x_a100"]
    # Billed by the minute nothing is paid ahead: the replacement is launched once the node has
    # had GPUs to spare for `migrate_after_s`, as before.
    assert launched(60.0)[1] == ["gpu_1x_a100"]


def test_in_the_simulated_world_a_job_that_ends_before_the_hour_buys_no_second_node() -> None:
    """Before the fix: an 8-GPU job of 20 minutes gets an 8-GPU node; a 35-minute 1-GPU job then
    runs alone on it, ending 5 minutes before the node's hour does. A 1-GPU replacement was
    launched for it 11 minutes before that end and, booted after the job was done, was billed an
    hour for nothing ($11.61 in all). Now only the 8-GPU node's hour is paid."""
    jobs = [JobSpec(0.0, 8, 1200.0), JobSpec(1900.0, 1, 2100.0)]
    world = World(billing_s=3600.0, failures_per_gpu_hour=0.0)
    result = run("procure", ProcurePolicy(), cfg(), jobs, "small job on a big node", world, hours=2)
    assert result.completed == 2
    assert result.restarts == 0
    assert result.cost_usd == round(8 * PRICE / 1e6, 4)  # one hour of the 8-GPU node alone
