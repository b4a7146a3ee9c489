"""A cloud account as a vendor: the request that describes it (`CloudVendorRequest`), the registry
entry it becomes, and saving it. Shared by `POST /api/vendors/cloud` and the dashboard's form."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from sqlalchemy.exc import IntegrityError

from procure.models import GPU_PATTERN, CloudTerms, Model, Vendor, usd_to_micros
from procure.store import Store, repo

MAX_PRICE_PER_HOUR_USD = 10_000
"""The most a vendor may charge per hour (US dollars): x402 and cloud vendors alike."""

MAX_COUNT = 16
MAX_REGIONS = 32
MIN_PRICE_PER_HOUR_USD = 0.001  # as `procure vendors add-cloud --max-price`
_VENDOR_ID = r"^[A-Za-z0-9_.-]+$"
# A region as its provider names it: Lambda's and RunPod's ids ("us-east-1", "US-TX-3"), or
# Vast.ai's geolocations, a place and its country code ("Oregon, US", letters of any script).
_REGION = r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*|\w[\w .'-]*, [A-Z]{2})$"
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
    outcomes); True if it is new. Synchronous: call it in a thread. (API, page and CLI alike.)"""
    vendor = cloud_vendor(body)
    try:
        return _save_once(store, vendor)
    except IntegrityError:
        # Another registration of this new id committed between the read and the insert: read
        # again, now it is a replacement (or refused when that one is not a cloud vendor).
        return _save_once(store, vendor)


def _save_once(store: Store, vendor: Vendor) -> tuple[Vendor, bool]:
    with store.session() as s:
        stored = repo.get_vendor(s, vendor.vendor_id)
        if stored is not None and stored.kind != "cloud":
            raise NotACloudVendor(vendor.vendor_id)
        return repo.save_vendor(s, vendor), stored is None
