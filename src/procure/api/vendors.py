"""The vendors resource: the registry with learned reliability and hazard, and `PUT` of one
vendor (its credential stored encrypted, never shown). Store calls run in a thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from procure.agent.context import hazard, reliability
from procure.api.schemas import VendorRegistration
from procure.models import Vendor
from procure.settings import Settings
from procure.store import Store, repo
from procure.vendors.credentials import CredentialError, Keyring

log = logging.getLogger(__name__)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def vendors_router(
    settings: Settings,
    store: Store,
    require_token: Callable[..., None],
    require_read: Callable[..., None],
) -> APIRouter:
    router = APIRouter(tags=["vendors"])
    keyrings: list[Keyring] = []  # loaded on first use (it may create the key file)

    def listed() -> list[Any]:
        with store.session() as s:
            return [
                {
                    **v.to_json(),
                    "learnedReliability": round(reliability(v), 4),
                    "hazardPerHour": round(hazard(v), 6),
                }
                for v in repo.list_vendors(s)
            ]

    @router.get("/api/vendors", dependencies=[Depends(require_read)])
    async def vendors() -> list[Any]:
        return await asyncio.to_thread(listed)

    def encrypt(credential: str) -> str:
        if not keyrings:
            keyrings.append(Keyring.load(settings.home))
        return keyrings[0].encrypt(credential)

    def save(vendor: Vendor, clear: bool) -> Vendor:
        with store.session() as s:
            return repo.save_vendor(s, vendor, clear_credential=clear)

    @router.put("/api/vendors/{vendor_id}", dependencies=[Depends(require_token)])
    async def put_vendor(vendor_id: str, body: VendorRegistration) -> JSONResponse:
        """Register or replace a vendor. `credential` is write-only: stored encrypted, sent to
        this vendor alone, never shown (`hasCredential`). Left out, the stored one is kept
        unless the endpoint changes; `null` drops it."""
        if body.vendor_id != vendor_id:
            return _error(400, "vendorId in the body differs from the path")
        credential = None
        if body.credential is not None:
            try:  # the key file is read (or created) on disk: off the loop too
                credential = await asyncio.to_thread(encrypt, body.credential)
            except (CredentialError, OSError) as exc:
                log.error("cannot keep vendor credentials: %s", type(exc).__name__)
                return _error(503, f"cannot keep vendor credentials: {exc}")
        clear = "credential" in body.model_fields_set and body.credential is None
        saved = await asyncio.to_thread(save, body.to_vendor(credential), clear)
        return JSONResponse(saved.to_json())

    return router
