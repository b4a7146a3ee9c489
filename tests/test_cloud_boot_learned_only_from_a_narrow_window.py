"""A cloud's boot (launch to its node answering) is what the planner prices a cloud offer's
start-up at, learned per provider, region and GPU from the boots seen (`cloud_repo.learn`,
`cloud_offers.offer_terms`). It is read off the window the boot ended in: after the last poll
that saw the instance booting and by the first that saw it up. A narrow window gives its middle;
a wide one (the worker was down) teaches nothing. Fake cloud in process (the machine's edge),
real agent and store."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from cloud_fakes import (
    FakeCloud,
    cloud_vendor,
    drive,
    make_deps,
    new_run,
    new_store,
    offer,
    tmp_url,
)
from procure.agent.cloud_offers import offer_terms
from procure.agent.tick import tick
from procure.models import ObservationType, utcnow
from procure.store import cloud_repo, repo
from procure.store.cloud_repo import OfferStats


def _booted_after(
    tmp_path: Path, *, launched_ago: timedelta, booting_ago: timedelta
) -> tuple[OfferStats, float, float, list[str]]:
    """An instance launched `launched_ago`, last seen booting `booting_ago`, then seen up: what
    was learned of the offer's boots, the boot the planner then prices it at, the usual boot
    before any is seen, and what the run was told."""
    runpod = FakeCloud("runpod", [offer("runpod", "A100-dc1", 3.6)], boot_s=3600.0, job_s=1.0)
    store = new_store(tmp_url(tmp_path), [cloud_vendor("rp", "runpod", 50.0)])
    deps = make_deps(store, {"runpod": runpod}, boot_timeout_s=7200.0)
    run_id = new_run(store, 100.0)

    def seen_booting() -> bool:
        with store.session() as s:
            found = cloud_repo.instances_of_run(s, run_id)
        return bool(found) and found[0].status == "booting" and found[0].active_at is not None

    try:
        asyncio.run(drive(deps, run_id, until=seen_booting))
        now = utcnow()
        with store.session() as s:
            [inst] = cloud_repo.instances_of_run(s, run_id)
            cloud_repo.update_instance(
                s, inst.name, launched_at=now - launched_ago, active_at=now - booting_ago
            )
        runpod.boot_s = 0.0  # up at the next look
        asyncio.run(tick(deps, run_id))
        with store.session() as s:
            [inst] = cloud_repo.instances_of_run(s, run_id)
            assert inst.status == "running"
            stats = cloud_repo.offer_stats(s, "runpod")[("r1", "A100")]
            told = [
                o.content
                for o in repo.list_observations(s, run_id)
                if o.type == ObservationType.job_event and "its node answers at" in o.content
            ]
        priced = offer_terms(deps, offer("runpod", "A100-dc1", 3.6), stats).boot_s
        return stats, priced, deps.cloud.boot_s.get("runpod", 300.0), told
    finally:
        store.dispose()


def test_a_boot_seen_an_hour_late_is_not_learned(tmp_path: Path) -> None:
    """Before the fix: an instance last seen booting a minute after its launch, then not polled
    for an hour, was learned to boot in an hour (3,660 s): every later offer of its kind was
    priced at a boot of (90 + 3,660) / 2 = 1,875 s (RunPod's usual 90 s the prior), pushing
    deadline-tight runs off it."""
    stats, priced, usual, told = _booted_after(
        tmp_path, launched_ago=timedelta(minutes=61), booting_ago=timedelta(minutes=60)
    )
    assert (stats.boots, stats.boot_seconds) == (0, 0.0)
    assert priced == pytest.approx(usual)  # as before any boot was seen
    [said] = told
    assert "too late to learn its boot" in said, said


def test_a_boot_seen_soon_after_the_last_booting_poll_is_learned_at_the_windows_middle(
    tmp_path: Path,
) -> None:
    """Before the fix: the boot was read to the poll that saw it up (600 s), not to the middle
    of the 20 s in which it ended (590 s)."""
    stats, priced, usual, told = _booted_after(
        tmp_path, launched_ago=timedelta(minutes=10), booting_ago=timedelta(seconds=20)
    )
    assert stats.boots == 1
    assert stats.boot_seconds == pytest.approx(590.0, abs=5.0)
    assert priced == pytest.approx((usual + stats.boot_seconds) / 2)
    [said] = told
    assert said.startswith(f"Instance {said.split()[1]} booted in 59"), said
