"""Exactly once, through any crash: the worker runs as a child process and is killed over and over,
by SIGKILL at random moments and at named crash points (between signing and sending, between
the vendor's answer and the store's write, ...), while the facilitator and the vendors, which
are never killed, run here. After every death and at the end the invariants are checked (see
`tests/crash_harness.py`); any violation fails the campaign.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crash_harness import CrashConfig, CrashReport, run_campaign
from world import POSTGRES_ENV, postgres_database


def assert_sound(report: CrashReport, kills: int) -> None:
    assert report.kills == kills
    assert report.checks == kills  # the invariants held after every single death
    assert report.violations == []
    # Both kinds of death, and the crash points where money is in flight, were exercised.
    assert report.by_signal >= kills // 5
    # Where a death lands depends on the machine's speed (a loaded 2-core machine reaches fewer
    # crash points before its SIGKILL): the floors prove the crash points were exercised, the
    # invariants above are what must hold after every single death.
    points = report.by_crash_point
    assert sum(points.values()) >= 1, points  # the rest die by SIGKILL, at random
    # Every run ended; work was done and paid for, once each.
    assert set(report.runs) <= {"completed", "aborted", "failed", "cancelled"}, report.runs
    assert report.runs["completed"] >= kills // 20  # fewer than whole jobs: many pay in slices
    # Users cancelled runs and workers died carrying it out; slices were bought as jobs ran.
    assert report.cancels_requested >= kills // 40 and report.runs["cancelled"] >= 1
    # How many slices are renewed before a death depends on the machine's speed (4 of 100 on a
    # loaded 2-core machine, 10+ on a quiet one): the floor only proves renewals were exercised.
    assert report.vendor_renewals >= kills // 50
    assert report.payments.get("pending", 0) == 0
    assert report.transfers == report.payments["completed"] == report.vendor_starts


@pytest.mark.timeout(420)
def test_many_kills_lose_no_money_and_pay_nothing_twice(tmp_path: Path) -> None:
    # Sized for CI (2 cores); `python benchmarks/crash.py --kills 1000` runs the full campaign.
    report = run_campaign(CrashConfig(kills=100, workdir=tmp_path, check_every=1))
    print(report.summary())
    assert_sound(report, 100)


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_kills_on_postgresql(tmp_path: Path) -> None:
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    with postgres_database() as url:
        report = run_campaign(
            CrashConfig(kills=45, workdir=tmp_path, database_url=url, check_every=1)
        )
    print(report.summary())
    assert_sound(report, 45)
