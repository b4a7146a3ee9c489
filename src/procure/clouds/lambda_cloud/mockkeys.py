"""The mock Lambda Cloud's SSH keys: `GET`/`POST /api/v1/ssh-keys` and `DELETE
/api/v1/ssh-keys/{id}` as Lambda's spec answers them. dstack and SkyPilot list the account's keys
and add theirs before each launch, so without these a mock they cannot drive. A launch names one
key; once the account's keys are known (`MockCloudConfig.ssh_keys`, or any added here) a name it
does not have is refused with Lambda's 404, as Lambda refuses it."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request, params
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from procure.clouds.lambda_cloud.mockfaults import Faults, faulted, invalid, spec_body
from procure.clouds.lambda_cloud.mockstate import MockCloudState, Refusal

KEYS_PATH = "/api/v1/ssh-keys"


class AddKeyBody(BaseModel):
    """What the mock reads of an add (already checked against Lambda's spec)."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    public_key: str | None = Field(None, min_length=1, max_length=4096)


def generated_pair(name: str) -> tuple[str, str]:
    """(public key in OpenSSH form, private key in PEM): what Lambda returns when an add names
    no public key (it keeps only the public half)."""
    # Imported here: only an add without a public key needs it, not every mock's start.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    return f"{public.decode()} {name}", pem.decode()


def keys_router(
    state: MockCloudState, faults: Faults, dependencies: Sequence[params.Depends]
) -> APIRouter:
    router = APIRouter(dependencies=list(dependencies))

    @router.get(KEYS_PATH)
    async def list_keys() -> Response:
        async def answer() -> list[dict[str, str]]:
            with state.lock:
                return [dict(k) for k in state.ssh_keys.values()]

        return await faulted(faults, "ssh-keys", answer)

    @router.post(KEYS_PATH)
    async def add_key(request: Request) -> Response:
        body = await spec_body(request, KEYS_PATH, AddKeyBody)

        async def answer() -> dict[str, Any]:
            private = None
            public = body.public_key
            if public is None:
                public, private = generated_pair(body.name)
            with state.lock:
                if any(k["name"] == body.name for k in state.ssh_keys.values()):
                    raise invalid(f"an SSH key named {body.name!r} already exists")
                key = {"id": secrets.token_hex(16), "name": body.name, "public_key": public}
                state.ssh_keys[key["id"]] = key
                state.keys_known = True  # the account's keys are what is listed from now on
            return key | ({"private_key": private} if private is not None else {})

        return await faulted(faults, "ssh-keys", answer)

    @router.delete(KEYS_PATH + "/{key_id}")
    async def delete_key(key_id: str) -> Response:
        async def answer() -> dict[str, Any]:
            with state.lock:
                if state.ssh_keys.pop(key_id, None) is None:
                    raise Refusal(
                        404,
                        "global/not-found",
                        "Specified SSH key does not exist.",
                        "List SSH keys with GET /api/v1/ssh-keys.",
                    )
            return {}

        return await faulted(faults, "ssh-keys", answer)

    return router
