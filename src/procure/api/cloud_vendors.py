"""`POST /api/vendors/cloud`: register a cloud account (Lambda, RunPod, Vast.ai) as a vendor, as
`procure vendors add-cloud` does; the dashboard form (web.cloud_vendor_pages) saves the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from procure.agent.cloud_vendors import (
    MAX_COUNT,
    MAX_PRICE_PER_HOUR_USD,
    MIN_PRICE_PER_HOUR_USD,
    CloudVendorRequest,
    NotACloudVendor,
    cloud_vendor,
    save_cloud_vendor,
)
from procure.agent.context import hazard, reliability
from procure.models import Vendor
from procure.store import Store

__all__ = [
    "MAX_COUNT",
    "MAX_PRICE_PER_HOUR_USD",
    "MIN_PRICE_PER_HOUR_USD",
    "CloudVendorRequest",
    "NotACloudVendor",
    "as_listed",
    "cloud_vendor",
    "cloud_vendors_router",
    "save_cloud_vendor",
]


def as_listed(vendor: Vendor) -> dict[str, Any]:
    """The vendor as `GET /api/vendors` lists it."""
    return {
        **vendor.to_json(),
        "learnedReliability": round(reliability(vendor), 4),
        "hazardPerHour": round(hazard(vendor), 6),
    }


def cloud_vendors_router(store: Store, require_token: Callable[..., None]) -> APIRouter:
    router = APIRouter(tags=["vendors"])

    @router.post(
        "/api/vendors/cloud",
        dependencies=[Depends(require_token)],
        status_code=201,
        responses={
            200: {"description": "A cloud vendor of that id was replaced"},
            409: {"description": "The id belongs to a vendor that is not a cloud account"},
        },
    )
    async def add_cloud_vendor(body: CloudVendorRequest) -> JSONResponse:
        """Register a cloud account as a vendor: the agent launches an instance of the cheapest
        matching offer (at most `maxPricePerHour`), runs the job there and terminates it when
        the job ends. 201 when new; 200 when it replaces a cloud vendor of the same id (its
        learned outcomes kept); 409 when the id is an x402 vendor's."""
        try:
            vendor, new = await asyncio.to_thread(save_cloud_vendor, store, body)
        except NotACloudVendor as exc:
            return JSONResponse(
                {"error": f"vendor {exc} exists and is not a cloud vendor"}, status_code=409
            )
        return JSONResponse(as_listed(vendor), status_code=201 if new else 200)

    return router
