"""Prometheus metrics of the agent: ticks, their latency, runs, and money paid."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.orm import Session

from procure.models import micros_to_usd
from procure.store import repo

REGISTRY = CollectorRegistry()
TICKS = Counter("procure_ticks_total", "Ticks by outcome", ["outcome"], registry=REGISTRY)
TICK_SECONDS = Histogram("procure_tick_seconds", "Tick latency", registry=REGISTRY)
RUNS_STARTED = Counter("procure_runs_started_total", "Runs started", registry=REGISTRY)
RUNS = Gauge("procure_runs", "Runs by status", ["status"], registry=REGISTRY)
PAID_USD = Gauge("procure_paid_usd", "Completed payments, US dollars", registry=REGISTRY)


def observe_store(s: Session) -> None:
    for status, n in repo.count_runs_by_status(s).items():
        RUNS.labels(status).set(n)
    PAID_USD.set(micros_to_usd(sum(p.amount for p in repo.list_payments(s, status="completed"))))
