"""The runs page's line of total spend (across every run and the fleet), read from the store."""

from __future__ import annotations

from typing import Any

from procure.models import utcnow
from procure.store import Store
from procure.store.spend import spend_summary


def spend_total(store: Store) -> dict[str, Any]:
    with store.session() as s:
        return spend_summary(s, utcnow())
