"""The runs page's line of total spend (across every run and the fleet), and, where this store
also keeps a gateway's book, what the gateway earned, read from the store."""

from __future__ import annotations

from typing import Any

from procure.gateway.book import figures
from procure.models import utcnow
from procure.store import Store
from procure.store.spend import spend_summary


def spend_total(store: Store) -> dict[str, Any]:
    with store.session() as s:
        summary = spend_summary(s, utcnow())
    sold = figures(store)
    if sold["paymentsReceived"]:
        summary["gateway"] = {
            "income": sold["incomeUsd"],
            "costs": sold["instanceCostUsd"],
            "margin": sold["marginUsd"],
        }
    return summary
