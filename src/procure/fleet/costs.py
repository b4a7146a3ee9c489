"""What the fleet costs: hourly spend now, spend today and this month from instance-hours, the
projected month, and recommendations with the money they save."""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from procure.fleet.monitor import InstanceView
from procure.fleet.settings import FleetSettings
from procure.store import fleet_repo, ledger


def hourly_spend(s: Session) -> int:
    """micro-USD per hour of every instance billed now."""
    return sum(
        row.price_per_hour
        for row in fleet_repo.live_instances(s)
        if row.status in fleet_repo.RUNNING_STATUSES
    )


def cost_report(s: Session, now: datetime) -> dict[str, Any]:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    hourly = hourly_spend(s)
    this_month = ledger.fleet_spent(s, month, now, forward=False)
    days = calendar.monthrange(now.year, now.month)[1]
    month_end = month.replace(day=days, hour=23, minute=59, second=59)
    left_h = max(0.0, (month_end - now).total_seconds() / 3600)
    return {
        "current_hourly_spend": round(hourly / 1e6, 2),
        "spend_today": round(ledger.fleet_spent(s, day, now, forward=False) / 1e6, 2),
        "spend_this_month": round(this_month / 1e6, 2),
        "projected_month": round((this_month + hourly * left_h) / 1e6, 2),
    }


def recommendations(views: Sequence[InstanceView], cfg: FleetSettings) -> list[dict[str, Any]]:
    """Idle instances worth stopping (idle at least a third of the low window)."""
    found = []
    for v in views:
        if v.instance.status not in fleet_repo.RUNNING_STATUSES:
            continue
        if v.low_streak_min >= cfg.low_usage_duration_mins / 3:
            saves = v.instance.price_per_hour / 1e6
            found.append(
                {
                    "action": "terminate_instance",
                    "instance_id": v.id,
                    "saves_per_hour": round(saves, 2),
                    "text": f"terminate {v.id}: idle {v.low_streak_min:.0f} min "
                    f"({v.low_mean or 0:.1f}% GPU), saves ${saves:.2f}/h",
                }
            )
    return found
