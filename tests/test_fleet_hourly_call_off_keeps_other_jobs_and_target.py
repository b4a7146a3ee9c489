"""procure's fleet policy billed by the hour calls off a half-empty boot only where that costs no
job its queue-wait target: not where its jobs would take another boot's room from a job that
boot was launched for, nor where the rails' launch cooldown would hold the launch of their own
size past the target."""

from __future__ import annotations

from datetime import timedelta

from procure.clouds.mockworld.workload import JobSpec
from procure.fleet.policies import FleetSignal, ProcurePolicy
from procure.fleet.policy import PROVISION, TERMINATE
from procure.sim.fleet_world import World, run
from test_fleet_hourly_half_empty_boot_called_off import booting
from test_fleet_hourly_restarts_at_renewal import BOOT, OFFERS, PRICE, T0, cfg

MIN = 60.0


def test_a_call_off_never_hands_a_due_jobs_boot_to_another_job() -> None:
    """Before the fix: two 8-GPU boots, A at its last scan (its own job found a place), B
    launched for an 8-GPU job already due; the scheduler lists a new 1-GPU job first. The first
    fit put the 1-GPU job on A, so A was called off; then the 1-GPU job took B's room, the 8-GPU
    job had no place coming, another 8-GPU node was launched for it and B was called off in
    turn: three boots called off, three launched, and the 8-GPU job (due at 30 min) waited
    past 40 min. Now A boots, as before the call-offs: the 8-GPU job starts on B, in time."""
    policy = ProcurePolicy()  # a 30-min target: the 8-GPU job was due a launch at 20 min
    views = {"A": booting(BOOT - 30, 8, instance_id="A"), "B": booting(60.0, 8, instance_id="B")}
    waits = [2 * MIN, 21 * MIN]  # the 1-GPU job (first in the scheduler's order), the 8-GPU job
    called_off: list[str] = []
    launched = 0
    for scan in range(30):
        now = T0 + timedelta(seconds=60 * scan)
        up = [
            k for k, v in views.items() if (now - v.instance.first_seen_at).total_seconds() >= BOOT
        ]
        if up:
            break
        signal = FleetSignal(
            now=now,
            boot_s=BOOT,
            offers=OFFERS,
            billing_increment_s=3600.0,
            placement_known=True,
            queued=((1, waits[0]), (8, waits[1])),
        )
        for p in policy(list(views.values()), cfg(), PRICE, signal):
            if p.action_type == TERMINATE:
                called_off.append(str(p.target))
                views.pop(str(p.target))
            elif p.action_type == PROVISION:
                launched += 1
                name = f"L{launched}"
                views[name] = booting(
                    0.0, int(p.instance_type.split("_")[1][0]), instance_id=name, now=now
                )
        waits = [w + 60 for w in waits]
    assert called_off == [] and launched == 0, (called_off, launched)
    assert up == ["A"] and waits[1] <= 30 * MIN  # B boots for the 8-GPU job within its target


def test_under_a_launch_cooldown_a_half_empty_boot_still_boots_for_its_job() -> None:
    """Before the fix: with the rails' cooldown between launches (30 min by default), the
    1-GPU job's 8-GPU boot was called off all the same, and the rails held the launch of its own
    size until 30 min after the 8-GPU launch: it waited 46 min against a 30-min target. Now the
    boot is kept under a cooldown: it starts within its target (the hour of 8 GPUs is billed,
    as it was before the call-offs)."""
    jobs = [
        JobSpec(0.0, 8, 28 * MIN),  # gets the first 8-GPU node, up at 30 min, ends at 58
        JobSpec(31 * MIN, 8, 60 * MIN),  # a second 8-GPU node is launched for it at 51 min...
        JobSpec(45 * MIN, 1, 30 * MIN),  # ... but it takes the first at 58; this one is left
    ]
    world = World(billing_s=3600.0, failures_per_gpu_hour=0.0)
    result = run(
        "procure", ProcurePolicy(), cfg(action_cooldown_mins=30), jobs, "cooldown", world, hours=3
    )
    assert result.completed == 3
    assert result.wait_max_s <= 30 * MIN + 2 * MIN, result.wait_max_s / 60
    # Without a cooldown the boot is still called off and the job gets its own size in time.
    world = World(billing_s=3600.0, failures_per_gpu_hour=0.0)
    free = run("procure", ProcurePolicy(), cfg(), jobs, "no cooldown", world, hours=3)
    assert free.cost_usd < result.cost_usd and free.wait_max_s <= 30 * MIN + 2 * MIN
