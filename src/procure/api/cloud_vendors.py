"""`POST /api/vendors/cloud`: register a cloud account (Lambda, RunPod, Vast.ai) as a vendor, as
`procure vendors add-cloud` does; the dashboard form (web.cloud_vendor_pages) saves the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from procure.agent.context import hazard, reliability
from procure.api.offers import GPU_PATTERN
from procure.api.schemas import MAX_PRICE_PER_HOUR_USD
from procure.models import CloudTerms, Model, Vendor, usd_to_micros
from procure.store import Store, repo

MAX_COUNT = 16
MAX_REGIONS = 32
MIN_PRICE_PER_HOUR_USD = 0.001  # as `procure vendors add-cloud --max-price`
_VENDOR_ID = r"^[A-Za-z0-9_.-]+$"
_REGION = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_IMAGE = r"^[\x21-\x7e]+$"  # an image reference: visible ASCII, no spaces
_Region = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=_REGION)]


class CloudVendorRequest(Model):
    """A cloud account the agent may rent from: one GPU model and count, at most this price per
    hour for the whole instance. The provider's key comes from the server's environment
    (LAMBDA_API_KEY, RUNPOD_API_KEY or VAST_API_KEY), never from this body."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["lambda", "runpod", "vast"]
    gpu: StrictStr = Field(min_length=1, max_length=32, pattern=GPU_PATTERN, examples=["A100"])
    count: StrictInt = Field(1, ge=1, le=MAX_COUNT, description="GPUs per instance")
    max_price_per_hour: StrictFloat = Field(
        ge=MIN_PRICE_PER_HOUR_USD,
        le=MAX_PRICE_PER_HOUR_USD,
        allow_inf_nan=False,
        description="US dollars per hour",
    )
    spot: StrictBool = Field(False, description="Interruptible offers (Vast.ai bids) allowed")
    regions: list[_Region] = Field(
        default_factory=list, max_length=MAX_REGIONS, description="Empty: any region"
    )
    image: StrictStr | None = Field(
        None, min_length=1, max_length=300, pattern=_IMAGE, description="Container image"
    )
    vendor_id: StrictStr | None = Field(
        None, min_length=1, max_length=64, pattern=_VENDOR_ID, description="Default PROVIDER-GPU"
    )
    reliability: StrictFloat = Field(
        0.9, ge=0, le=1, allow_inf_nan=False, description="Prior reliability, 0..1"
    )


def cloud_vendor(body: CloudVendorRequest) -> Vendor:
    """The registry entry `procure vendors add-cloud` would save for the same values."""
    gpu = body.gpu.upper().replace(" ", "")
    price = usd_to_micros(body.max_price_per_hour)
    terms = CloudTerms(
        provider=body.provider,
        gpu=gpu,
        count=body.count,
        max_price_per_hour=price,
        spot=body.spot,
        regions=list(body.regions),
        image=body.image,
    )
    return Vendor(
        vendor_id=body.vendor_id or f"{body.provider}-{gpu.lower()}",
        name=f"{body.provider} {gpu}" + (" (spot)" if body.spot else ""),
        endpoint=f"cloud:{body.provider}",
        base_price_per_hour=price,
        reliability_score=body.reliability,
        supported_gpu_types=[gpu],
        kind="cloud",
        cloud=terms,
    )


class NotACloudVendor(Exception):
    """The id is taken by an x402 vendor: a cloud account never replaces one."""


def save_cloud_vendor(store: Store, body: CloudVendorRequest) -> tuple[Vendor, bool]:
    """Save the cloud vendor (replacing a cloud vendor of the same id, keeping its learned
    outcomes); True if it is new. Synchronous: call it in a thread."""
    vendor = cloud_vendor(body)
    with store.session() as s:
        stored = repo.get_vendor(s, vendor.vendor_id)
        if stored is not None and stored.kind != "cloud":
            raise NotACloudVendor(vendor.vendor_id)
        return repo.save_vendor(s, vendor), stored is None


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
