"""The seed's action summary, and the fleet's status, from the store alone (invariant 6). Error
texts (which may quote a URL with its password or a webhook's path) are shown redacted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from procure.fleet import costs, monitor
from procure.fleet.settings import FleetSettings
from procure.safetext import redact
from procure.store import fleet_repo
from procure.store.fleet_tables import ActionRow


def action_json(row: ActionRow) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "action_id": row.action_id,
        "action_type": row.action_type,
        "target_instance": row.target_instance,
        "reason": _redacted(row.reason),
        "cost_impact": None if row.cost_impact is None else float(row.cost_impact),
        "status": row.status,
        "dry_run": row.dry_run,
        "blocked_by": row.block_reason,
        "needed_approval": row.needed_approval,
        "expires_at": iso(row.expires_at),
        "decided_by": row.decided_by,
        "rollback_of": row.rollback_of,
        "metrics_before": row.metrics_before,
        "metrics_after": row.metrics_after,
        "created_at": iso(row.created_at),
        "executed_at": iso(row.executed_at),
        "error_message": _redacted(row.error_message),
    }


def _redacted(text: str | None) -> str | None:
    return None if text is None else redact(text)


def as_of(s: Session, cfg: FleetSettings, now: datetime) -> datetime:
    """The controller's last scan, on its own clock (which may run faster than this process's),
    or `now` when there has been none: the views are computed as that scan saw them."""
    lease = fleet_repo.lease_row(s, f"fleet:{cfg.fleet_name}")
    return lease.last_scan_at if lease is not None and lease.last_scan_at else now


def summary(s: Session, cfg: FleetSettings, now: datetime) -> dict[str, Any]:
    now = as_of(s, cfg, now)
    counts = fleet_repo.count_actions(s)
    running = [r for r in fleet_repo.live_instances(s) if r.status in fleet_repo.RUNNING_STATUSES]
    acted = {k: v for k, v in counts.by_status.items() if k != "blocked"}
    by_type: dict[str, int] = {}
    for (action_type, status), n in counts.by_type_status.items():
        if status != "blocked":
            by_type[action_type] = by_type.get(action_type, 0) + n
    lease = fleet_repo.lease_row(s, f"fleet:{cfg.fleet_name}")
    return {
        "total_actions": sum(acted.values()),
        "actions_by_type": by_type,
        "total_cost_impact": round(sum(counts.cost_by_type.values()), 2),
        "successful_actions": counts.by_status.get("executed", 0)
        + counts.by_status.get("rolled_back", 0),
        "failed_actions": counts.by_status.get("failed", 0),
        "pending_confirmations": counts.by_status.get("pending", 0),
        "current_hourly_spend": round(costs.hourly_spend(s) / 1e6, 2),
        "max_hourly_spend": cfg.max_hourly_spend,
        "instances_running": len(running),
        "max_instances": cfg.max_instances,
        # Beyond the seed:
        "blocked_actions": counts.by_status.get("blocked", 0),
        "safety_blocks": counts.blocks_by_reason,
        "cost": costs.cost_report(s, now),
        "controller": None
        if lease is None
        else {
            "owner": lease.owner,
            # A dry run's lease is taken by the first live controller: whether `owner` acts.
            "dry_run": lease.dry_run,
            "last_scan_at": lease.last_scan_at.isoformat() if lease.last_scan_at else None,
            "last_error": _redacted(lease.last_error),
        },
    }


def instances(s: Session, cfg: FleetSettings, now: datetime) -> list[dict[str, Any]]:
    now = as_of(s, cfg, now)
    live = fleet_repo.live_instances(s)
    recent = fleet_repo.samples_since(s, [r.instance_id for r in live], now - monitor.lookback(cfg))
    return [v.to_json() for v in monitor.views(live, recent, cfg, now)]
