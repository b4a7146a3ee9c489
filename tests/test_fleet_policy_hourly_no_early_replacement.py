"""procure's fleet policy billed by the hour, at its default queue-wait target: a node with GPUs
to spare gets no replacement launched ahead of its hour's end (it would be billed a whole hour
from its boot, even where the job it was for ends first); the job moves, if it still runs, at
that end, and waits a boot there, which the target leaves room for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from procure.clouds.base import InstanceType
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet import monitor
from procure.fleet.policies import FleetSignal, ProcurePolicy
from procure.fleet.policy import PROVISION, TERMINATE
from procure.fleet.settings import FleetSettings
from procure.sim.fleet_world import World, run
from procure.store.fleet_tables import FleetInstanceRow, FleetSampleRow

T0 = datetime(2026, 1, 5, tzinfo=UTC)
PRICE = 1_290_000  # gpu_1x_a100, micro-USD per hour
OFFERS = tuple(
    InstanceType(
        f"gpu_{n}x_a100",
        f"{n}x A100 (40 GB {'SXM4' if n == 8 else 'PCIe'})",
        n,
        PRICE * n,
        ["us-east-1"],
    )
    for n in (1, 2, 4, 8)
)
BOOT = 600.0


def cfg() -> FleetSettings:
    return FleetSettings(
        _env_file=None,  # type: ignore[call-arg]
        dry_run=False,
        action_cooldown_mins=0,
        min_instances=0,
        max_instances=32,
        max_hourly_spend=100.0,
        scan_interval_s=60.0,
        confirmation_threshold=1e6,
        default_instance_type="gpu_1x_a100",
    )


def big_node(now: datetime, left_s: float) -> monitor.InstanceView:
    """An active 8-GPU node running one 1-GPU job, `left_s` before its third hour ends."""
    row = FleetInstanceRow(
        instance_id="i-1",
        name=None,
        instance_type="gpu_8x_a100",
        region="us-east-1",
        ip=None,
        status="active",
        price_per_hour=PRICE * 8,
        gpus=8,
        launched_by="a",
        first_seen_at=now - timedelta(seconds=3 * 3600 - left_s),
        last_seen_at=now,
        ended_at=None,
    )
    sample = FleetSampleRow(instance_id="i-1", taken_at=now, reachable=True, gpu_util=98.0 / 8)
    return monitor.InstanceView(row, sample, 0.0, 0.0, None, None)


def launched(increment: float, target_s: float = 1800.0) -> list[list[str]]:
    """The types launched at each of three scans of that node: 25, 12 and 0.5 minutes before its
    increment ends (a replacement launched at the second would boot 2 minutes before that end)."""
    p = ProcurePolicy(target_wait_s=target_s, migrate_after_s=600)
    out = []
    for left_s in (1500.0, BOOT + 120, 30.0):
        now = T0 + timedelta(seconds=1500 - left_s)
        signal = FleetSignal(
            now=now,
            boot_s=BOOT,
            offers=OFFERS,
            billing_increment_s=increment,
            placement_known=True,
            free_gpus=(("i-1", 7),),
            jobs_on=(("i-1", (1,)),),
        )
        acts = p([big_node(now, left_s)], cfg(), PRICE, signal)
        out.append([x.instance_type for x in acts if x.action_type == PROVISION])
        if any(x.action_type == TERMINATE for x in acts):
            out[-1].append("8x goes")
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
