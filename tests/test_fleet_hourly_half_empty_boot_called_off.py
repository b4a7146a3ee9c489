"""procure's fleet policy billed by the hour: a big node booting for a job that found a place
elsewhere, which the jobs still queued would fill at most half of, is called off before its
billing begins; those jobs get a node of their own size instead (a boot later), unless that
would start them past their queue-wait target, no smaller type has capacity, or the instance
cap leaves room for one more instance only."""

from __future__ import annotations

from datetime import datetime, timedelta

from procure.clouds.base import InstanceType
from procure.clouds.mockworld.workload import JobSpec
from procure.fleet import monitor
from procure.fleet.policies import FleetSignal, ProcurePolicy
from procure.fleet.policy import PROVISION, TERMINATE
from procure.sim.fleet_world import World, run
from procure.store.fleet_tables import FleetInstanceRow
from test_fleet_hourly_restarts_at_renewal import BOOT, OFFERS, PRICE, T0, cfg

MIN = 60.0


def test_in_the_simulated_world_a_1_gpu_job_does_not_keep_an_8_gpu_boot() -> None:
    """Before the fix: an 8-GPU node launched for an 8-GPU job that then took another node's
    place booted all the same because a 1-GPU job queued behind would take it: 8 GPUs billed a
    whole hour for one ($30.96 in all). Now that boot is called off and the 1-GPU job gets a
    1-GPU node ($21.93), still within its 30-minute target (and a scan)."""
    jobs = [
        JobSpec(0.0, 8, 28 * MIN),  # gets the first 8-GPU node, up at 30 min, ends at 58
        JobSpec(31 * MIN, 8, 60 * MIN),  # a second 8-GPU node is launched for it at 51 min...
        JobSpec(45 * MIN, 1, 30 * MIN),  # ... but it takes the first at 58; this one is left
    ]
    world = World(billing_s=3600.0, failures_per_gpu_hour=0.0)
    result = run("procure", ProcurePolicy(), cfg(), jobs, "1 GPU for an 8", world, hours=3)
    assert result.completed == 3
    assert result.restarts == 0
    # The first 8-GPU node for two hours, the 1-GPU job's own node for one.
    assert result.cost_usd == round((2 * 8 * PRICE + PRICE) / 1e6, 4)
    assert result.wait_max_s <= 30 * MIN + 2 * MIN


def booting(
    now_age_s: float, gpus: int = 8, *, instance_id: str = "i-1", now: datetime = T0
) -> monitor.InstanceView:
    """A booting instance of `gpus` GPUs, launched `now_age_s` before `now`."""
    row = FleetInstanceRow(
        instance_id=instance_id,
        name=None,
        instance_type=f"gpu_{gpus}x_a100",
        region="us-east-1",
        ip=None,
        status="booting",
        price_per_hour=PRICE * gpus,
        gpus=gpus,
        launched_by=instance_id,
        first_seen_at=now - timedelta(seconds=now_age_s),
        last_seen_at=now,
        ended_at=None,
    )
    return monitor.InstanceView(row, None, 0.0, 0.0, None, None)


def acts(
    queued: tuple[tuple[int, float], ...],
    *,
    offers: tuple[InstanceType, ...] = OFFERS,
    increment: float = 3600.0,
    age_s: float = BOOT - 30,
    max_instances: int = 32,
    target_s: float = 1800.0,
) -> list[tuple[str, str | None]]:
    """One scan of an 8-GPU node 30 s before its boot ends, with `queued` jobs (GPUs, waited)."""
    signal = FleetSignal(
        now=T0,
        boot_s=BOOT,
        offers=offers,
        billing_increment_s=increment,
        placement_known=True,
        queued=queued,
    )
    p = ProcurePolicy(target_wait_s=target_s)
    out = p([booting(age_s)], cfg(max_instances=max_instances), PRICE, signal)
    return [(p.action_type, p.target) for p in out]


def test_a_boot_the_queue_fills_at_most_half_of_is_called_off_where_a_smaller_type_holds_it() -> (
    None
):
    one_job = ((1, 5 * MIN),)
    assert acts(one_job) == [(TERMINATE, "i-1")]
    assert acts(((4, 5 * MIN),)) == [(TERMINATE, "i-1")]  # half of it: a 4-GPU node
    # More than half used: it boots and takes them.
    assert acts(((4, 5 * MIN), (1, 5 * MIN))) == []
    # A job that has waited 20 min would start past its 30-min target after a boot of its own,
    # and under a 10-min target any job would: the boot is kept for it.
    assert acts(((1, 20 * MIN),)) == []
    assert acts(one_job, target_s=600.0) == []
    # No smaller type has capacity now: the jobs' own launch would be this type again.
    full = tuple(
        InstanceType(t.name, t.description, t.gpus, t.price_per_hour, [] if t.gpus < 8 else ["x"])
        for t in OFFERS
    )
    assert acts(one_job, offers=full) == []
    # At the instance cap the last instance launched is the largest type again: kept.
    assert acts(one_job, max_instances=1) == []
    # Billed by the minute a boot is never called off (an idle node goes in a minute).
    assert acts(one_job, increment=60.0) == []
    # Not at the last scan before its boot ends: a job may still come that fills it.
    assert acts(one_job, age_s=120.0) == []


def test_a_due_job_whose_big_boot_was_called_off_gets_its_own_size_at_the_next_scan() -> None:
    p = ProcurePolicy()
    signal = FleetSignal(
        now=T0,
        boot_s=BOOT,
        offers=OFFERS,
        billing_increment_s=3600.0,
        placement_known=True,
        queued=((1, 21 * MIN),),
    )
    out = p([], cfg(), PRICE, signal)
    assert [(x.action_type, x.instance_type) for x in out] == [(PROVISION, "gpu_1x_a100")]
