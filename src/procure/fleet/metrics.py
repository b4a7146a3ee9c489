"""The seed's Prometheus metrics, read from the store at scrape time (so any process serving
/metrics tells the truth, and the figures survive restarts): actions, cost impact, instances
managed, safety blocks, confirmations, GPU utilisation and instance cost per period."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from procure.models import utcnow
from procure.store import Store, fleet_repo
from procure.store.fleet_tables import FleetSampleRow

NAMES = (
    "lambda_labs_autonomous_actions",
    "lambda_labs_autonomous_cost_impact_dollars",
    "lambda_labs_autonomous_instances_managed",
    "lambda_labs_autonomous_safety_blocks",
    "lambda_labs_autonomous_confirmations_required",
    "lambda_labs_gpu_utilization_percent",
    "lambda_labs_instance_cost_dollars",
)


log = logging.getLogger(__name__)


class FleetCollector(Collector):
    """Register once; point `store` at the store to read (None: nothing to report)."""

    def __init__(self, store: Store | None = None, clock: Callable[[], datetime] = utcnow):
        self.store = store
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # the families are built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        if self.store is None:
            return
        try:
            yield from self._collect(self.store)
        except SQLAlchemyError as exc:
            # A store that cannot be read (gone, down) loses the fleet's families from this
            # scrape; it never turns the whole /metrics into a 500.
            log.warning("fleet metrics not read: %s", type(exc).__name__)

    def _collect(self, store: Store) -> Iterator[Metric]:
        now = self.clock()
        actions = CounterMetricFamily(
            "lambda_labs_autonomous_actions", "Autonomous actions", labels=["action_type", "status"]
        )
        impact = GaugeMetricFamily(
            "lambda_labs_autonomous_cost_impact_dollars",
            "Cost impact of executed actions, $/hour (negative: savings)",
            labels=["action_type"],
        )
        managed = GaugeMetricFamily(
            "lambda_labs_autonomous_instances_managed", "Instances billed now"
        )
        blocks = CounterMetricFamily(
            "lambda_labs_autonomous_safety_blocks", "Actions blocked by a rail", labels=["reason"]
        )
        confirmations = CounterMetricFamily(
            "lambda_labs_autonomous_confirmations_required", "Actions that needed approval"
        )
        util = GaugeMetricFamily(
            "lambda_labs_gpu_utilization_percent",
            "Latest GPU utilisation per instance (mean over its GPUs)",
            labels=["instance_id", "instance_name", "instance_type"],
        )
        cost = GaugeMetricFamily(
            "lambda_labs_instance_cost_dollars",
            "Instance cost: per hour, today, this month",
            labels=["instance_id", "instance_type", "period"],
        )
        with store.session() as s:
            counts = fleet_repo.count_actions(s)
            entered = fleet_repo.actions_entered(s)  # a counter: never back, whatever moves on
            live = [
                r for r in fleet_repo.live_instances(s) if r.status in fleet_repo.RUNNING_STATUSES
            ]
            latest_ids = (
                select(func.max(FleetSampleRow.id))
                .where(FleetSampleRow.instance_id.in_([r.instance_id for r in live]))
                .group_by(FleetSampleRow.instance_id)
            )
            latest = {
                x.instance_id: x
                for x in s.scalars(select(FleetSampleRow).where(FleetSampleRow.id.in_(latest_ids)))
            }
        for (action_type, status), n in sorted(entered.items()):
            actions.add_metric([action_type, status], n)
        for action_type, dollars in sorted(counts.cost_by_type.items()):
            impact.add_metric([action_type], dollars)
        managed.add_metric([], len(live))
        for reason, n in sorted(counts.blocks_by_reason.items()):
            blocks.add_metric([reason], n)
        confirmations.add_metric([], counts.confirmations_required)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month = day.replace(day=1)
        for r in live:
            sample = latest.get(r.instance_id)
            if sample is not None and sample.gpu_util is not None:
                util.add_metric([r.instance_id, r.name or "", r.instance_type], sample.gpu_util)
            price = r.price_per_hour / 1e6
            for period, since in (("today", day), ("month", month)):
                hours = max(0.0, (now - max(r.first_seen_at, since)).total_seconds() / 3600)
                cost.add_metric([r.instance_id, r.instance_type, period], round(price * hours, 4))
            cost.add_metric([r.instance_id, r.instance_type, "hour"], price)
        yield from (actions, impact, managed, blocks, confirmations, util, cost)
