"""The seed's rule: provision when every instance has been above the high threshold for the high
duration (or the pool is under its minimum); terminate an instance below the low threshold for
the low duration, never going under the minimum. It only proposes: the rails decide."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from procure.fleet.monitor import InstanceView
from procure.fleet.settings import FleetSettings
from procure.store.fleet_repo import RUNNING_STATUSES

PROVISION = "provision_instance"
TERMINATE = "terminate_instance"


@dataclass(frozen=True)
class Proposal:
    action_type: str
    target: str | None
    reason: str
    instance_type: str
    region: str
    price_per_hour: int  # micro-USD
    metrics_before: dict[str, Any] = field(default_factory=dict)

    @property
    def cost_impact(self) -> float:
        """$/h: positive for a launch, negative (a saving) for a termination."""
        sign = 1 if self.action_type == PROVISION else -1
        return round(sign * self.price_per_hour / 1e6, 2)


def snapshot(views: Sequence[InstanceView]) -> dict[str, Any]:
    """The figures a decision was made on (kept as the action's metrics_before)."""
    return {
        "instances": [
            {
                "id": v.id,
                "status": v.instance.status,
                "gpu_util": v.latest.gpu_util if v.latest else None,
                "high_streak_min": round(v.high_streak_min, 1),
                "low_streak_min": round(v.low_streak_min, 1),
            }
            for v in views
        ],
        "hourly_spend": round(
            sum(v.instance.price_per_hour for v in views if v.instance.status in RUNNING_STATUSES)
            / 1e6,
            2,
        ),
    }


def decide(
    views: Sequence[InstanceView], cfg: FleetSettings, launch_price: int | None
) -> list[Proposal]:
    """Proposals for this scan. `launch_price`: the default type's price (None: unknown, no
    launch can be proposed)."""
    running = [v for v in views if v.instance.status in RUNNING_STATUSES]
    active = [v for v in running if v.instance.status == "active"]
    booting = [v for v in running if v.instance.status == "booting"]
    before = snapshot(views)
    proposals: list[Proposal] = []

    def launch(reason: str) -> Proposal:
        return Proposal(
            PROVISION,
            None,
            reason,
            cfg.default_instance_type,
            cfg.region,
            launch_price or 0,
            before,
        )

    if launch_price is not None:
        if len(running) < cfg.min_instances:
            proposals.append(
                launch(f"Pool below its minimum: {len(running)} of {cfg.min_instances} instances")
            )
        elif (
            active
            and not booting  # capacity already on its way absorbs the load first
            and all(v.high_streak_min >= cfg.high_usage_duration_mins for v in active)
        ):
            mean = sum(v.high_mean or 0 for v in active) / len(active)
            shortest = min(v.high_streak_min for v in active)
            proposals.append(
                launch(
                    f"All {len(active)} instance(s) above {cfg.high_gpu_threshold:g}% GPU "
                    f"({mean:.1f}% mean) for {shortest:.0f} minutes"
                )
            )
    keep = len(running)
    idle = [v for v in active if v.low_streak_min >= cfg.low_usage_duration_mins]
    for v in sorted(idle, key=lambda x: -x.low_streak_min):
        if keep <= cfg.min_instances:
            break
        keep -= 1
        proposals.append(
            Proposal(
                TERMINATE,
                v.id,
                f"Sustained low GPU usage ({v.low_mean or 0:.1f}%) for "
                f"{v.low_streak_min:.0f} minutes",
                v.instance.instance_type,
                v.instance.region,
                v.instance.price_per_hour,
                before,
            )
        )
    return proposals
