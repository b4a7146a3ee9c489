"""The total of spend across runs and the fleet, for `procure spend`, `GET /api/spend` and the
dashboard's runs page: paid and pending from the running totals, windows from the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from procure.models import micros_to_usd
from procure.store import ledger, totals

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def spend_summary(s: Session, now: datetime) -> dict[str, Any]:
    """Dollars: what runs paid (settled and still pending), what the fleet's instances cost
    so far, their sum, and the spend of the ledger's windows (the ones the global caps use)."""
    counted = totals.read(s)
    paid = counted.get("micros:completed", 0)
    pending = counted.get("micros:pending", 0)
    fleet = ledger.fleet_spent(s, EPOCH, now, forward=False)
    runs = sum(n for name, n in counted.items() if name.startswith("runs:"))
    return {
        "currency": "USD",
        "runs": runs,
        "paid": micros_to_usd(paid),
        "pending": micros_to_usd(pending),
        "fleet": micros_to_usd(fleet),
        "total": micros_to_usd(paid + pending + fleet),
        "windows": {
            window: micros_to_usd(held)
            for window, held in ledger.spent_in(s, list(ledger.WINDOWS), now=now).items()
        },
    }
