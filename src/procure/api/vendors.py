"""The vendors resource: the registry with learned reliability and hazard, `PUT` and `PATCH` of
one vendor (its credential stored encrypted, never shown), clearing a cooldown. Store calls run
in a thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from procure.agent.context import hazard, reliability
from procure.api.schemas import CLOUD_ENDPOINTS, READ_ONLY_VENDOR_FIELDS, VendorRegistration
from procure.bounds import UnsafeInput, clip, loads
from procure.models import Vendor, usd_to_micros
from procure.settings import Settings
from procure.store import Store, repo
from procure.vendors.credentials import CredentialError, Keyring

log = logging.getLogger(__name__)


_KEPT = ("pay_to", "network", "asset")
"""Optional registry fields a write that leaves them out keeps as stored."""
_WRITABLE_JSON = frozenset(
    VendorRegistration.model_fields[k].alias or k
    for k in VendorRegistration.model_fields
    if k not in READ_ONLY_VENDOR_FIELDS
)


def _named(changes: dict[str, Any]) -> set[str]:
    """The attribute names of the fields a PATCH body names (camelCase or snake_case)."""
    by_alias = {(f.alias or k): k for k, f in VendorRegistration.model_fields.items()}
    return {by_alias.get(k, k) for k in changes} - READ_ONLY_VENDOR_FIELDS


def _patch_schema() -> dict[str, Any]:
    """PUT's schema with nothing required: a PATCH names only what changes."""
    schema = VendorRegistration.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    schema.pop("required", None)
    schema["title"] = "VendorPatch"
    return schema


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _storable(vendor_id: str) -> bool:
    """False for a path id no vendor can have that PostgreSQL would refuse to even look up (a
    NUL character): such an id is unknown on both stores alike, a 404."""
    return "\x00" not in vendor_id


def _not_found(vendor_id: str) -> JSONResponse:
    # the id comes from the path, unchecked: an error repeats only a bounded part of it
    return _error(404, f"vendor {clip(vendor_id, 100)} not found")


def _off_terms(body: VendorRegistration, stored: Vendor) -> str | None:
    """Why `body` cannot be written over cloud vendor `stored`: its price and GPU types are
    those of its cloud terms (the agent rents by the terms), so they change only with them."""
    changed = [
        name
        for name, same in (
            (
                "basePricePerHour",
                usd_to_micros(body.base_price_per_hour) == stored.base_price_per_hour,
            ),
            ("supportedGpuTypes", list(body.supported_gpu_types) == stored.supported_gpu_types),
        )
        if not same
    ]
    if not changed:
        return None
    return (
        f"{stored.vendor_id} is a cloud vendor: {' and '.join(changed)} come from its cloud "
        "terms; change them with POST /api/vendors/cloud"
    )


class _CloudEndpoint(Exception):
    """The vendor is a cloud account (as its write found it): its endpoint stays this one."""


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

    def save(body: VendorRegistration, credential: str | None, given: set[str]) -> Vendor | None:
        try:
            return save_once(body, credential, given)
        except IntegrityError:
            # Another registration of this new id committed between our read and our insert
            # (a second operator, a client retrying): read again, now it is a replacement.
            return save_once(body, credential, given)

    def save_once(
        body: VendorRegistration, credential: str | None, given: set[str]
    ) -> Vendor | None:
        """Write `body` over the stored vendor: fields left out keep their stored value (a
        PUT that omits network and asset must not make the vendor unpayable), read-only ones
        are ignored. `given`: the fields the request named. A PATCH (`given` smaller than the
        body) needs the vendor to exist: None if it does not."""
        partial = given != body.model_fields_set - READ_ONLY_VENDOR_FIELDS
        with store.session() as s:
            stored = repo.get_vendor(s, body.vendor_id)
            if stored is None and partial:
                return None
            # Checked again here, in the write's transaction: a cloud account registered under
            # this id since the request's first read must not take this x402 endpoint.
            if stored is not None and stored.kind == "cloud" and body.endpoint != stored.endpoint:
                raise _CloudEndpoint(stored.endpoint)
            vendor = body.to_vendor(credential)
            if stored is not None and partial:
                # Only what the PATCH named, over the vendor as it is now: the rest of `body`
                # was read before this transaction, and writing it back would undo a change
                # committed meanwhile (another PATCH, a PUT that moved the endpoint).
                named = {k: getattr(vendor, k) for k in given if k in Vendor.model_fields}
                return repo.save_vendor(
                    s,
                    stored.model_copy(update={**named, "credential": credential}),
                    clear_credential="credential" in given and body.credential is None,
                )
            if stored is not None:
                kept = {k: getattr(stored, k) for k in _KEPT if k not in given}
                # kind and cloud terms are the registry's own, never changed by this route
                vendor = vendor.model_copy(
                    update={**kept, "kind": stored.kind, "cloud": stored.cloud}
                )
            clear = "credential" in given and body.credential is None
            return repo.save_vendor(s, vendor, clear_credential=clear)

    async def write(
        vendor_id: str,
        body: VendorRegistration,
        given: set[str] | None = None,
        stored: Vendor | None = None,
    ) -> JSONResponse:
        """Save `body` as `vendor_id`; `stored`: the vendor as the caller already read it."""
        if body.vendor_id != vendor_id:
            return _error(400, "vendorId in the body differs from the path")
        if stored is None:
            stored = await asyncio.to_thread(_get, vendor_id)
        cloud = stored is not None and stored.kind == "cloud"
        if cloud and stored is not None and body.endpoint != stored.endpoint:
            return _error(
                422, f"{vendor_id} is a cloud vendor: its endpoint stays {stored.endpoint}"
            )
        off_terms = _off_terms(body, stored) if cloud and stored is not None else None
        if off_terms is not None:
            return _error(422, off_terms)
        if not cloud and body.endpoint in CLOUD_ENDPOINTS:
            return _error(422, "endpoint: cloud vendors are added with POST /api/vendors/cloud")
        credential = None
        if body.credential is not None:
            try:  # the key file is read (or created) on disk: off the loop too
                credential = await asyncio.to_thread(encrypt, body.credential)
            except (CredentialError, OSError) as exc:
                log.error("cannot keep vendor credentials: %s", type(exc).__name__)
                return _error(503, f"cannot keep vendor credentials: {exc}")
        named = body.model_fields_set - READ_ONLY_VENDOR_FIELDS if given is None else given
        try:
            saved = await asyncio.to_thread(save, body, credential, named)
        except _CloudEndpoint as exc:
            return _error(422, f"{vendor_id} is a cloud vendor: its endpoint stays {exc}")
        if saved is None:
            return _not_found(vendor_id)
        return JSONResponse(saved.to_json())

    @router.put("/api/vendors/{vendor_id}", dependencies=[Depends(require_token)])
    async def put_vendor(vendor_id: str, body: VendorRegistration) -> JSONResponse:
        """Register or replace a vendor. Optional fields left out (payTo, network, asset)
        keep their stored value; `null` clears them. Read-only fields (as `GET` answers them)
        are ignored, so a vendor read can be written back as it is. `credential` is
        write-only: stored encrypted, sent to this vendor alone, never shown
        (`hasCredential`). Left out, the stored one is kept unless the endpoint changes;
        `null` drops it. A cloud vendor's endpoint, price and GPU types are those of its cloud
        terms: 422 if they differ (`POST /api/vendors/cloud` changes them)."""
        return await write(vendor_id, body)

    @router.patch(
        "/api/vendors/{vendor_id}",
        dependencies=[Depends(require_token)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _patch_schema()}},
            }
        },
    )
    async def patch_vendor(vendor_id: str, request: Request) -> JSONResponse:
        """Change only the fields given (any of `PUT`'s); 404 for an unknown vendor."""
        try:
            changes = loads(await request.body())
        except UnsafeInput as exc:
            return _error(400, f"invalid JSON: {exc}")
        if not isinstance(changes, dict):
            return _error(422, "invalid request: the body must be a JSON object")
        stored = await asyncio.to_thread(_get, vendor_id)
        if stored is None:
            return _not_found(vendor_id)
        base = {
            k: v
            for k, v in stored.to_json().items()
            if k in _WRITABLE_JSON and k not in ("credential",)
        }
        merged = {**base, "vendorId": vendor_id, **changes}
        try:
            body = VendorRegistration.model_validate(merged)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        # only what the patch named counts as given: the rest is kept as stored
        return await write(vendor_id, body, _named(changes), stored)

    def _get(vendor_id: str) -> Vendor | None:
        if not _storable(vendor_id):
            return None
        with store.session() as s:
            return repo.get_vendor(s, vendor_id)

    def clear(vendor_id: str) -> Vendor | None:
        if not _storable(vendor_id):
            return None
        with store.session() as s:
            return repo.clear_cooldown(s, vendor_id)

    @router.delete("/api/vendors/{vendor_id}/cooldown", dependencies=[Depends(require_token)])
    async def clear_vendor_cooldown(vendor_id: str) -> JSONResponse:
        """End a vendor's cooldown now (after a failure planners keep off it for
        VENDOR_COOLDOWN_S): for when an operator knows it is fixed."""
        vendor = await asyncio.to_thread(clear, vendor_id)
        if vendor is None:
            return _not_found(vendor_id)
        log.info("vendor %s: cooldown cleared", vendor_id)
        return JSONResponse(vendor.to_json())

    return router
