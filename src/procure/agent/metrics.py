"""Prometheus metrics of the agent: ticks by outcome (a fixed set, whoever ticked: the API or the
in-process worker), their latency, runs, and money paid (a counter, read from the store)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from procure import warnings
from procure.agent import worker
from procure.models import RunStatus, micros_to_usd
from procure.store import totals

REGISTRY = CollectorRegistry()

# A tick's message carries free text (progress, dates, vendor reasons): the label takes only the
# outcome it starts with, so the series stay a fixed, small set.
OUTCOMES: tuple[tuple[str, str], ...] = (
    ("Job started", "job_started"),
    ("Job running", "job_running"),
    ("Job completed", "job_completed"),
    ("Job failed", "job_failed"),
    ("Job stopped", "job_stopped"),
    ("Vendor error", "vendor_error"),
    ("Quote rejected", "quote_rejected"),
    ("Waiting", "waiting"),
    ("Payment in doubt", "payment_in_doubt"),
    ("Payment outcome unknown", "payment_in_doubt"),
    ("Payment settled", "payment_settled"),
    ("Payment refused", "payment_refused"),
    ("Insufficient balance", "insufficient_balance"),
    ("Slice renewed", "slice_renewed"),
    ("Slice not bought", "slice_not_bought"),
    ("Slice refused", "slice_refused"),
    ("Slice payment settled", "slice_settled"),
    ("State changed", "state_changed"),
    ("Run already", "run_ended"),
    ("Run failed", "run_failed"),
    ("Run aborted", "run_aborted"),
    ("Run cancelled", "run_cancelled"),
    ("Run not found", "run_not_found"),
    ("Tick error", "error"),
    ("Cancelled", "cancelled"),
    ("Lease lost", "lease_lost"),
)
OUTCOME_LABELS = tuple(dict.fromkeys([label for _, label in OUTCOMES] + ["other"]))
SOURCES = ("api", "worker")


def outcome_of(message: str) -> str:
    """The outcome label for a tick's message: one of OUTCOME_LABELS, never the text itself."""
    for prefix, label in OUTCOMES:
        if message.startswith(prefix):
            return label
    return "other"


class TickCounter:
    """`procure_ticks_total{outcome, source}`; `labels(message)` takes a tick's message."""

    def __init__(self) -> None:
        self.counter = Counter(
            "procure_ticks",
            "Ticks by outcome and by who ticked (api, worker)",
            ["outcome", "source"],
            registry=REGISTRY,
        )
        for outcome in OUTCOME_LABELS:  # every series exists from the start: rate() sees 0
            for source in SOURCES:
                self.counter.labels(outcome, source)

    def labels(self, message: str, source: str = "api") -> Counter:
        return self.counter.labels(outcome_of(message), source if source in SOURCES else "api")


class PaidCollector(Collector):
    """`procure_paid_usd_total`: completed payments, read from the store at each scrape."""

    def __init__(self) -> None:
        self.usd = 0.0

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "procure_paid_usd", "Completed payments, US dollars", value=self.usd
        )


class WarningsCollector(Collector):
    """Warnings before caps (procure.warnings) and the figures the alert rules need: crossings
    by scope, running runs past their threshold, each budget's share in use, the oldest
    running run's idle time, and each vendor's job outcomes."""

    def __init__(self) -> None:
        self.by_scope: dict[str, int] = {}
        self.runs_over = 0
        self.idle_s = 0.0
        self.vendors: list[tuple[str, int, int]] = []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        crossed = CounterMetricFamily(
            "procure_budget_warnings",
            "Budgets that crossed their warning threshold, by scope (run, ledger, fleet)",
            labels=["scope"],
        )
        for scope in ("run", "ledger", "fleet"):
            crossed.add_metric([scope], self.by_scope.get(scope, 0))
        yield crossed
        yield GaugeMetricFamily(
            "procure_runs_over_warning",
            "Running runs past their budget's warning threshold",
            value=self.runs_over,
        )
        yield GaugeMetricFamily(
            "procure_budget_warning_threshold",
            "Share of every budget that warns (PROCURE_WARNING_THRESHOLD)",
            value=warnings.LEVELS.threshold,
        )
        used = GaugeMetricFamily(
            "procure_budget_used_ratio",
            "Share in use of each global ledger window and fleet cap (the last warning sweep)",
            labels=["scope", "budget"],
        )
        for (scope, budget), value in sorted(warnings.LEVELS.used.items()):
            used.add_metric([scope, budget], value)
        yield used
        yield GaugeMetricFamily(
            "procure_run_idle_seconds_max",
            "Seconds since the least recently updated running run changed (0: none running)",
            value=self.idle_s,
        )
        jobs = CounterMetricFamily(
            "procure_vendor_jobs",
            "Jobs each vendor finished, by outcome (success, failure)",
            labels=["vendor", "outcome"],
        )
        for vendor, ok, failed in self.vendors:
            jobs.add_metric([vendor, "success"], ok)
            jobs.add_metric([vendor, "failure"], failed)
        yield jobs


TICKS = TickCounter()
TICK_SECONDS = Histogram("procure_tick_seconds", "Tick latency", registry=REGISTRY)
RUNS_STARTED = Counter("procure_runs_started", "Runs started", registry=REGISTRY)
RUNS = Gauge("procure_runs", "Runs by status", ["status"], registry=REGISTRY)
PAID = PaidCollector()
REGISTRY.register(PAID)
WARNINGS = WarningsCollector()
REGISTRY.register(WARNINGS)


def observe_store(s: Session) -> None:
    """From the store's running totals (procure.store.totals): constant time and memory
    whatever the store holds; a status with no runs left reads 0, not its last count."""
    if totals.span(s) > totals.FOLD_ABOVE:  # nobody folded lately (no worker): fold first
        totals.fold(s)
    counted = totals.read(s)
    for status in RunStatus:
        RUNS.labels(status.value).set(counted.get(f"runs:{status.value}", 0))
    PAID.usd = micros_to_usd(counted.get("micros:completed", 0))
    WARNINGS.by_scope, WARNINGS.runs_over = warnings.counts(s)
    WARNINGS.idle_s, WARNINGS.vendors = warnings.ops_figures(s)


def observe_worker_tick(message: str, seconds: float) -> None:
    """The in-process worker's ticks count as the API's do."""
    TICKS.labels(message, "worker").inc()
    TICK_SECONDS.observe(max(0.0, seconds))


worker.TICK_OBSERVERS.append(observe_worker_tick)
