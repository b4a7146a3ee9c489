"""The Fleet page's data, from the fleet controller's own service functions: instances with a
utilisation sparkline, spend against the caps, pending approvals, history and recommendations.
Imported only when the fleet modules are there (the dashboard works without them)."""

from __future__ import annotations

from datetime import datetime
from html import escape
from typing import Any

from markupsafe import Markup

from procure.fleet import costs, monitor
from procure.fleet.actions import ActionRefused, decide, judged_at
from procure.fleet.settings import FleetSettings
from procure.fleet.summary import action_json, as_of, instances, summary
from procure.models import utcnow
from procure.store import Store, fleet_repo
from procure.store.ledger import load_caps, spent

__all__ = ["ActionRefused", "approve_or_reject", "fleet_view"]
HISTORY = 50
CAP_LABELS = {
    "hour": ("All spend, last hour", "PROCURE_MAX_SPEND_PER_HOUR"),
    "day": ("All spend, last 24 h", "PROCURE_MAX_SPEND_PER_DAY"),
    "month": ("All spend, last 30 days", "PROCURE_MAX_SPEND_PER_MONTH"),
}
"""What each gauge measures: runs' payments and fleet instance-hours together, per window."""
ALARM_CLASS = {"sustained_high": "status-pending", "sustained_low": "status-idle"}
"""Load signals (a reason to scale) are not failures: not red like one."""


def sparkline(values: list[float], top: float = 100.0) -> Markup:
    """GPU utilisation over the look-back window as a tiny SVG line."""
    if not values:
        return Markup('<span class="muted">no samples</span>')
    w, h = 120, 28
    step = w / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{h - 2 - min(max(v, 0), top) / top * (h - 4):.1f}"
        for i, v in enumerate(values)
    )
    label = (
        f"GPU utilisation, last {values[-1]:.0f}% (low {min(values):.0f}%, "
        f"high {max(values):.0f}%, scale 0–{top:.0f}%)"
    )
    return Markup(  # the scale drawn: a faint line at the top (100%) and the bottom (0%)
        f'<svg class="spark" viewBox="0 0 {w} {h}" role="img" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>"
        f'<line class="grid" x1="0" y1="2" x2="{w}" y2="2"/>'
        f'<line class="grid" x1="0" y1="{h - 2}" x2="{w}" y2="{h - 2}"/>'
        f'<polyline points="{points}"/></svg>'
        f'<span class="spark-scale muted">{min(values):.0f}–{max(values):.0f}%</span>'
    )


def _gauge(window: str, used: int, cap: int | None) -> dict[str, Any]:
    share = None if not cap else used / cap
    return {"window": window, "used": used, "cap": cap, "share": share}


def fleet_view(store: Store, cfg: FleetSettings) -> dict[str, Any]:
    now = utcnow()
    with store.session() as s:
        seen = as_of(s, cfg, now)
        judged = judged_at(s, cfg.fleet_name, now)  # what approving will judge expiry by
        live = fleet_repo.live_instances(s)
        recent = fleet_repo.samples_since(
            s, [r.instance_id for r in live], seen - monitor.lookback(cfg)
        )
        views = monitor.views(live, recent, cfg, seen)
        caps = load_caps()
        windows = {"hour": caps.per_hour, "day": caps.per_day, "month": caps.per_month}
        gauges = [_gauge(w, spent(s, w, now=now), cap) for w, cap in windows.items()]
        for gauge in gauges:
            gauge["label"], gauge["setting"] = CAP_LABELS[gauge["window"]]
        pending = [action_json(r) for r in fleet_repo.list_actions(s, status="pending")]
        pending_total = fleet_repo.count_status(s, "pending")  # the page lists at most 100
        history = [action_json(r) for r in fleet_repo.list_actions(s, limit=HISTORY)]
        listed = instances(s, cfg, now)
        overview = summary(s, cfg, now)
    series: dict[str, list[float]] = {}
    for sample in sorted(recent, key=lambda r: r.taken_at):
        if sample.gpu_util is not None:
            series.setdefault(sample.instance_id, []).append(float(sample.gpu_util))
    for row in listed:
        row["spark"] = sparkline(series.get(row["instance_id"], []))
    for action in pending:
        action["seconds_left"] = _seconds_left(action["expires_at"], judged)
    hourly = overview["current_hourly_spend"]
    return {
        "summary": overview,
        "instances": listed,
        "gauges": [
            {
                "window": "fleet hourly",
                "label": "Fleet, per hour now",
                "setting": "LAMBDA_LABS_MAX_HOURLY_SPEND",
                "used": round(hourly * 1e6),
                "cap": round(cfg.max_hourly_spend * 1e6),
                "share": hourly / cfg.max_hourly_spend if cfg.max_hourly_spend else None,
            },
            *gauges,
        ],
        "pending": pending,
        "pending_total": pending_total,
        "history": history,
        "recommendations": costs.recommendations(views, cfg),
        "dry_run": cfg.dry_run,
        "alarm_class": ALARM_CLASS,
    }


def _seconds_left(expires_at: str | None, now: datetime) -> float | None:
    if expires_at is None:
        return None
    return max(0.0, (datetime.fromisoformat(expires_at) - now).total_seconds())


def approve_or_reject(
    store: Store, cfg: FleetSettings, action_id: str, approve: bool, by: str
) -> dict[str, Any]:
    """As `POST /api/fleet/actions/{id}/approve|reject`: raises KeyError or ActionRefused."""
    row = decide(
        store,
        action_id,
        approve,
        by,
        utcnow(),
        slack=cfg.slack_webhook_url is not None,
        fleet_name=cfg.fleet_name,
    )
    return action_json(row)
