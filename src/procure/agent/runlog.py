"""One log line per run event (started, job started, completed, failed, ...), so that
`procure serve` and `procure worker` say what the runs do; other ticks stay silent."""

from __future__ import annotations

import json
import logging
from typing import Any

from procure.agent.deps import TickResult
from procure.models import Run, format_usd
from procure.safetext import clean

log = logging.getLogger("procure.runs")

EVENTS = frozenset(
    {
        "Job started",
        "Job started (reconciled)",
        "Job completed",
        "Job failed",
        "Job stopped at a checkpoint",
        "Instance launched",
        "Run failed",
        "Run aborted",
        "Run cancelled",
    }
)


def run_started(run: Run) -> None:
    log.info(
        "run %s started: %s, budget %s",
        run.id,
        clean(run.goal, 80),
        format_usd(run.budget_total),
    )


def ticked(run_id: str, result: TickResult) -> None:
    """Log `result` if it is a run event (a job started or ended, the run ended)."""
    if result.message not in EVENTS:
        return
    action = result.action
    vendor = f" on {action.vendor_id}" if action is not None and action.vendor_id else ""
    (log.warning if "failed" in result.message else log.info)(
        "run %s: %s%s", run_id, result.message, vendor
    )


def readable(metrics: dict[str, Any] | None) -> str:
    """A vendor's metrics as a person reads them (`loss 0.13, accuracy 0.91`), not a dict."""
    if not metrics:
        return "no metrics"
    shown = []
    for key, value in list(metrics.items())[:12]:
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = json.dumps(value, separators=(",", ":"))[:80]
        shown.append(f"{clean(key, 40)} {clean(value, 80)}")
    return ", ".join(shown) + (", …" if len(metrics) > 12 else "")
