"""The Lambda Cloud API v1 client (`Cloud` of `clouds.base`): instance types with prices and
capacity, instances, launch and terminate, over httpx with one deadline per call and client-side
pacing. The API key goes only in the Authorization header: never in a log or an exception."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from procure.bounds import UnsafeInput, loads
from procure.clouds.base import AuthError, CloudError, Instance, InstanceType, ProviderError
from procure.clouds.lambda_cloud import wire
from procure.clouds.lambda_cloud.pacing import Pacer
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.httpbounds import bounded_client

log = logging.getLogger(__name__)
MAX_NAME = 64  # Lambda's limit on an instance name
GONE = {"terminating", "terminated", "preempted"}


class LambdaCloud:
    """One account's client. `transport` routes requests elsewhere (tests); `pacer` spaces
    them (default: Lambda's published limits on the wall clock)."""

    def __init__(
        self,
        settings: LambdaSettings | None = None,
        *,
        pacer: Pacer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = settings or LambdaSettings()
        self._key = settings.api_key.get_secret_value() if settings.api_key else ""
        self.base_url = settings.api_url.rstrip("/")
        self.pacer = pacer or Pacer()
        headers = {"Accept": "application/json", "User-Agent": "procure-fleet"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = bounded_client(
            deadline_s=settings.timeout_s,
            transport=transport,
            base_url=self.base_url,
            headers=headers,
            follow_redirects=False,  # a redirect could carry the key to another host
        )

    def __repr__(self) -> str:
        return f"LambdaCloud({self.base_url!r})"

    async def instance_types(self) -> list[InstanceType]:
        return wire.instance_types(await self._call("GET", "/api/v1/instance-types"))

    async def instances(self) -> list[Instance]:
        return wire.instances(await self._call("GET", "/api/v1/instances"))

    async def instance(self, instance_id: str) -> Instance | None:
        """One instance, or None when Lambda does not know it (any more)."""
        try:
            body = await self._call("GET", f"/api/v1/instances/{_segment(instance_id)}")
        except _NotFound:
            return None
        return wire.one_instance(body)

    async def find_by_name(self, name: str) -> list[Instance]:
        """Instances named `name`: how a launch retried after a crash finds what it launched."""
        return [i for i in await self.instances() if i.name == name]

    async def launch(
        self, *, instance_type: str, region: str, name: str, ssh_key_names: list[str]
    ) -> list[str]:
        if len(name) > MAX_NAME:
            raise CloudError(f"instance name longer than Lambda's {MAX_NAME} characters")
        body = {
            "region_name": region,
            "instance_type_name": instance_type,
            "ssh_key_names": ssh_key_names,
            "name": name,
        }
        # Never retried here: Lambda's launch takes no idempotency key. After an error the
        # caller looks for `name` (find_by_name) before launching again.
        answer = await self._call("POST", "/api/v1/instance-operations/launch", body, launch=True)
        ids = wire.launched_ids(answer)
        log.info("launched %s (%s in %s) as %s", name, instance_type, region, ", ".join(ids))
        return ids

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        """Terminate; an instance already gone (unknown, terminating, terminated) is not an
        error, so a retry after a crash is harmless."""
        if not instance_ids:
            return []
        path = "/api/v1/instance-operations/terminate"
        try:
            return wire.terminated(await self._call("POST", path, {"instance_ids": instance_ids}))
        except _NotFound:
            pass
        # One of them is unknown to Lambda, which refuses the whole call: terminate the rest.
        wanted = set(instance_ids)
        live = [i.id for i in await self.instances() if i.id in wanted and i.status not in GONE]
        if not live:
            return []
        try:
            return wire.terminated(await self._call("POST", path, {"instance_ids": live}))
        except _NotFound:
            return []  # gone in between

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, launch: bool = False
    ) -> Any:
        what = f"{method} {path.split('/api/v1', 1)[-1]}"
        if not self._key:
            raise AuthError(f"{what}: LAMBDA_API_KEY is not set")
        await self.pacer.wait(launch=launch)
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise ProviderError(f"{what}: Lambda gave no complete answer in time") from None
        except httpx.HTTPError as exc:
            detail = self._scrub(f"{type(exc).__name__}: {exc}")
            raise ProviderError(f"{what}: {detail}") from None
        try:
            parsed = loads(response.content) if response.content else None
        except UnsafeInput:
            parsed = None
        if response.is_success:
            if parsed is None:
                raise ProviderError(f"{what}: Lambda answered {response.status_code} with no JSON")
            return parsed
        code = wire.error_code(parsed)
        if response.status_code == 404 and code and code[0] == "global/object-does-not-exist":
            raise _NotFound(what)
        found = wire.error_for(response.status_code, parsed, what)
        error = type(found)(self._scrub(str(found)))
        log.warning("%s", error)
        raise error

    def _scrub(self, text: str) -> str:
        # A provider or proxy that echoes the request must not put the key in our messages.
        return text.replace(self._key, "***") if self._key else text


class _NotFound(CloudError):
    """Lambda's 404 object-does-not-exist (internal: callers see None or an idempotent no-op)."""


def _segment(value: str) -> str:
    if not value or len(value) > 200 or any(c in value for c in "/?#%") or value in (".", ".."):
        raise CloudError("not an instance id")
    return value
