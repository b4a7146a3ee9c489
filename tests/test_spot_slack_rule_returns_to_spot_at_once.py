"""The slack rule leaves on-demand for spot the tick spot comes back while its slack still pays
half of every expected outage's restarts (as the exact optimum on the traces' fitted chains
does), and waits for spot to stay up only below that."""

from __future__ import annotations

import pytest

from procure.agent import deadline
from procure.sim.spot_engine import play_planner
from procure.sim.traces import Setting

TEN_MINUTES = 1 / 6
# 12 h of work in 13 h: six 20-minute spot runs, each ended by a 10-minute outage (the learned
# failure rate climbs), then a two-hour outage (on-demand), then spot for good.
SETTING = Setting(deadline_hours=13.0, overhead_hours=0.05, task_hours=12.0)
TICKS = ([True] * 2 + [False]) * 6 + [False] * 12 + [True] * 120


def test_back_on_spot_the_tick_it_returns_while_slack_pays_half_the_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the change: off on-demand only once spot had stayed up 1.5 start-ups whenever
    the slack could not pay every expected outage's two restarts, which here held the run on
    on-demand for a tick after spot came back: $1.05 more, for no fewer start-ups."""
    played = play_planner(TICKS, TEN_MINUTES, SETTING)
    assert played.account.finished is not None and played.account.finished <= 13.0 + 1e-9
    monkeypatch.setattr(deadline, "CONFIRM_SHARE", 1.0)  # the rule before the change
    confirmed = play_planner(TICKS, TEN_MINUTES, SETTING)
    assert played.account.launches == confirmed.account.launches
    # One 10-minute tick on spot in place of on-demand: ($3.06 - $0.9701) / 6, and more.
    assert played.cost < confirmed.cost - 0.3


def test_with_almost_no_slack_spot_must_still_stay_up_first() -> None:
    # Slack so short it cannot pay even half the restarts: spot that comes back for single
    # 10-minute blips is not worth two start-ups, so the run stays on-demand through them.
    setting = Setting(deadline_hours=24.4, overhead_hours=0.1, task_hours=24.0)
    ticks = ([False] * 5 + [True]) * 6 + [True] * 150
    played = play_planner(ticks, TEN_MINUTES, setting)
    assert played.account.finished is not None and played.account.finished <= 24.4 + 1e-9
    assert played.account.launches == 2  # on-demand through the blips, then spot for good
