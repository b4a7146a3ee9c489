"""`GET /api/spend`: the total of spend across runs and the fleet (a read: the token when one is
set, unless PROCURE_PUBLIC_READ=true)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends

from procure.models import utcnow
from procure.store import Store
from procure.store.spend import spend_summary


def spend_router(store: Store, require_read: Callable[..., None]) -> APIRouter:
    router = APIRouter(tags=["spend"])

    def read() -> dict[str, Any]:
        with store.session() as s:
            return spend_summary(s, utcnow())

    @router.get("/api/spend", dependencies=[Depends(require_read)])
    async def spend() -> dict[str, Any]:
        """US dollars: `paid` (settled payments of every run), `pending` (payments not yet
        settled), `fleet` (the fleet's instance-hours so far), `total` (their sum), and
        `windows` (the last hour, day and 30 days, as the global caps count them)."""
        return await asyncio.to_thread(read)

    return router
