"""The safety rails every action passes, in the seed's order: dry run, cooldown per action type,
instance cap, hourly spend cap, the global spend caps, and the confirmation threshold. The
first that refuses blocks the action with its reason; an action over the threshold waits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy.orm import Session

from procure.fleet.policy import PROVISION, Proposal
from procure.fleet.settings import FleetSettings
from procure.models import format_usd, usd_to_micros
from procure.store import fleet_repo, ledger
from procure.store.fleet_tables import ActionRow, FleetInstanceRow


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["go", "blocked", "pending"]
    reason: str | None = None  # the rail that refused: a metric label
    detail: str = ""  # for people: "would exceed $100/hour limit"


GO = Verdict("go")


def _launching(s: Session, live: list[FleetInstanceRow], action_id: str | None) -> list[ActionRow]:
    """Launches in flight, other than `action_id`, whose instance is not yet among `live`."""
    landed = {r.launched_by for r in live}
    return [
        a
        for a in fleet_repo.list_actions(s, status="executing", limit=1000)
        if a.action_type == PROVISION and a.action_id != action_id and a.action_id not in landed
    ]


def check(
    s: Session,
    p: Proposal,
    cfg: FleetSettings,
    caps: ledger.SpendCaps,
    now: datetime,
    *,
    dry_run: bool,
    approved: bool = False,
    action_id: str | None = None,
) -> Verdict:
    """Run the rails. `approved`: a person has approved it (or asked for a rollback), or it
    is a launch being retried, so the cooldown and the confirmation threshold no longer apply;
    the caps always do. `action_id`: the recorded action checked again (not counted twice)."""
    if dry_run:
        return Verdict("blocked", "dry_run", "dry run: nothing was sent to the cloud")
    if not approved and cfg.action_cooldown_mins > 0:
        last = fleet_repo.last_acted(s, p.action_type)
        cooldown = timedelta(minutes=cfg.action_cooldown_mins)
        if last is not None and now - last < cooldown:
            ago = (now - last).total_seconds() / 60
            return Verdict(
                "blocked",
                "cooldown",
                f"in cooldown: the last {p.action_type} was {ago:.0f} min ago "
                f"(cooldown {cfg.action_cooldown_mins:g} min)",
            )
    if p.action_type == PROVISION:
        if p.price_per_hour <= 0:
            # A price the catalogue did not give: the caps below would count the launch as free,
            # and the cloud would be asked for it with no ceiling.
            return Verdict(
                "blocked",
                "spend_limit",
                f"{p.instance_type or 'the type'}'s price is unknown: the spend caps cannot be "
                "checked against it",
            )
        live = [r for r in fleet_repo.live_instances(s) if r.status in fleet_repo.RUNNING_STATUSES]
        flying = _launching(s, live, action_id)
        in_flight = len(flying)
        if len(live) + in_flight + 1 > cfg.max_instances:
            return Verdict(
                "blocked",
                "instance_limit",
                f"would exceed the {cfg.max_instances} instance limit "
                f"({len(live)} running, {in_flight} launching)",
            )
        # A launch in flight (waiting out a cloud error, or answered but not yet listed) will
        # bill like a running instance: it counts against the caps as one.
        hourly = sum(r.price_per_hour for r in live) + sum(a.price_per_hour for a in flying)
        cap = usd_to_micros(cfg.max_hourly_spend)
        if hourly + p.price_per_hour > cap:
            return Verdict(
                "blocked",
                "spend_limit",
                f"would exceed {format_usd(cap)}/hour limit "
                f"({format_usd(hourly)}/h now + {format_usd(p.price_per_hour)}/h)",
            )
        # The ledger counts the other launches in flight (the agent's checks see them too).
        conflict = ledger.global_cap_conflict(s, caps, p.price_per_hour, now=now, but=action_id)
        if conflict:
            return Verdict("blocked", "global_spend_cap", conflict)
    if not approved and p.cost_impact > cfg.confirmation_threshold:
        return Verdict(
            "pending",
            None,
            f"cost impact ${p.cost_impact:.2f}/hour exceeds the confirmation threshold "
            f"${cfg.confirmation_threshold:.2f}/hour",
        )
    return GO
