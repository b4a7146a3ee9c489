"""Exactly once, through any crash: the worker runs as a child process and is killed over and over,
at every named crash point of its path by schedule (between signing and sending, between the
vendor's answer and the store's write, ...) and by SIGKILL at random moments, while the
facilitator and the vendors, which are never killed, run here. After every death and at the end
the invariants are checked (see `tests/crash_checks.py`); any violation fails the campaign.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crash_checks import CrashReport
from crash_harness import (
    ELSEWHERE,
    SET_UP_BY,
    WORKER_POINTS,
    CrashConfig,
    run_campaign,
)
from procure import crashpoints
from world import POSTGRES_ENV, postgres_database


def test_the_schedule_kills_at_every_crash_point_the_code_defines() -> None:
    """A crash point added to the code must be added to a campaign (or named in ELSEWHERE)."""
    assert set(WORKER_POINTS) | set(ELSEWHERE) == crashpoints.POINTS
    assert not set(WORKER_POINTS) & set(ELSEWHERE)


def test_a_crash_point_dies_at_its_kth_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    class Died(BaseException):
        pass

    def die(code: int) -> None:
        raise Died(code)

    monkeypatch.setattr(os, "_exit", die)
    try:
        crashpoints.configure("paid@3,signed@1")
        crashpoints.crash_point("paid")
        crashpoints.crash_point("intent")
        crashpoints.crash_point("paid")
        with pytest.raises(Died):
            crashpoints.crash_point("paid")
        crashpoints.crash_point("paid")  # only the k-th: a restarted worker counts afresh
        with pytest.raises(Died):
            crashpoints.crash_point("signed")
        for bad in ("paid@0", "paid@x", "nowhere@1"):
            with pytest.raises(ValueError):
                crashpoints.configure(bad)
    finally:
        crashpoints.configure(None)


def assert_sound(report: CrashReport, rounds: int) -> None:
    assert report.checks == report.kills  # the invariants held after every single death
    assert report.violations == []
    # Every crash point of the worker's path was killed at, `rounds` times at least (set-up
    # deaths add more): by schedule, whatever the machine's speed.
    assert not report.missed, f"never reached: {dict(report.missed)}"
    points = report.by_crash_point
    assert {p: points[p] for p in WORKER_POINTS if points[p] < rounds} == {}, points
    # ... and after each (but where the next one needs the state it left), a death at a random
    # moment, by SIGKILL.
    assert report.by_signal == rounds * (len(WORKER_POINTS) - len(SET_UP_BY))
    assert report.kills == report.by_signal + sum(points.values())
    # Every run ended; work was done and paid for, once each.
    assert set(report.runs) <= {"completed", "aborted", "failed", "cancelled"}, report.runs
    assert report.runs["completed"] >= 1, report.runs
    # Each scheduled cancel was carried out (the death at `cancel_sent` came first).
    assert report.cancels_requested == rounds
    assert report.runs["cancelled"] >= rounds, report.runs
    assert report.payments.get("pending", 0) == 0
    assert report.transfers == report.payments["completed"] == report.vendor_starts


@pytest.mark.timeout(400)
def test_scheduled_and_random_kills_lose_no_money_and_pay_nothing_twice(tmp_path: Path) -> None:
    # Each point at its 1st and 2nd hit; `python benchmarks/crash.py --kills 1000` runs the
    # random campaign at length.
    report = run_campaign(CrashConfig(rounds=2, workdir=tmp_path, check_every=1))
    print(report.summary())
    assert_sound(report, 2)


@pytest.mark.postgres
@pytest.mark.timeout(400)
def test_kills_on_postgresql(tmp_path: Path) -> None:
    if not os.environ.get(POSTGRES_ENV):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} must be set under CI=true: PostgreSQL tests cannot skip")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    with postgres_database() as url:
        report = run_campaign(
            CrashConfig(rounds=1, workdir=tmp_path, database_url=url, check_every=1)
        )
    print(report.summary())
    assert_sound(report, 1)
