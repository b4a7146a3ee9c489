"""Warnings before the fleet's caps (instances, hourly spend) and the global ledger's windows,
checked by one sweep that also delivers the warnings' Slack and webhook messages: the background
task `procure serve` and `procure fleet run` start beside their other work."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from procure import warnings
from procure.fleet.outbox import write_audit
from procure.fleet.settings import FleetSettings
from procure.httpbounds import bounded_client
from procure.models import usd_to_micros, utcnow
from procure.store import Store, fleet_repo, ledger

log = logging.getLogger(__name__)


def check_fleet(
    s: Session, cfg: FleetSettings, threshold: float, now: datetime
) -> list[warnings.Crossing]:
    """The fleet caps past `threshold`: each recorded once per hour while it stays there."""
    live = [r for r in fleet_repo.live_instances(s) if r.status in fleet_repo.RUNNING_STATUSES]
    hourly = sum(r.price_per_hour for r in live)
    period = now.strftime("%Y-%m-%dT%H")
    levels = [
        ("instances", len(live), cfg.max_instances, "count"),
        ("hourly_spend", hourly, usd_to_micros(cfg.max_hourly_spend), "usd"),
    ]
    crossed = []
    for budget, used, cap, unit in levels:
        warnings.LEVELS.used[("fleet", budget)] = used / cap if cap else 1.0
        if cap > 0 and used >= threshold * cap:
            c = warnings.Crossing("fleet", budget, period, used, cap, threshold, unit)
            if warnings.record(s, c, now):
                crossed.append(c)
    return crossed


def sweep(
    store: Store,
    threshold: float,
    caps: ledger.SpendCaps,
    fleet: FleetSettings | None,
    now: datetime | None = None,
) -> list[warnings.Crossing]:
    """One pass over the ledger's windows and (with `fleet`) the fleet's caps."""
    now = now or utcnow()
    warnings.LEVELS.threshold = threshold
    with store.session() as s:
        crossed = warnings.check_ledger(s, caps, threshold, now)
        if fleet is not None:
            crossed += check_fleet(s, fleet, threshold, now)
    return crossed


async def deliver_all(store: Store, cfg: warnings.WarningSettings) -> int:
    """Deliver the queued warnings once (Slack and the generic webhook)."""
    slack = cfg.slack_webhook_url.get_secret_value() if cfg.slack_webhook_url else None
    hook = cfg.webhook_url.get_secret_value() if cfg.webhook_url else None
    async with bounded_client(deadline_s=cfg.timeout_s) as client:
        return await warnings.deliver(
            store, client, warnings.SLACK, slack
        ) + await warnings.deliver(store, client, warnings.WEBHOOK, hook)


async def run_warnings(
    store: Store,
    cfg: warnings.WarningSettings | None = None,
    caps: ledger.SpendCaps | None = None,
    fleet: FleetSettings | None = None,
    every_s: float = 5.0,
    audit_log: Path | None = None,
) -> None:
    """Forever: sweep the budgets, deliver the warnings. Errors are logged; the loop carries on.
    `audit_log`: where the warnings' audit entries are written, where no fleet outbox does it
    (`procure serve` without the fleet): never written, they stayed queued for good."""
    cfg = cfg or warnings.WarningSettings()
    caps = caps if caps is not None else ledger.load_caps()
    while True:
        try:
            await asyncio.to_thread(sweep, store, cfg.threshold, caps, fleet)
            await deliver_all(store, cfg)
            if audit_log is not None:
                await write_audit(store, audit_log, None)
            # Delivered messages go after a week here too: without the fleet's outbox loop
            # (`procure serve` alone) nothing else would prune them.
            with store.session() as s:
                fleet_repo.prune_outbox(s, utcnow() - timedelta(days=7))
        except Exception:
            log.exception("checking or delivering budget warnings failed; retrying")
        await asyncio.sleep(every_s)
