"""The Lambda Cloud API v1 client, both `Cloud` (the fleet: instance types, instances, launch,
terminate) and `RentalCloud` (the agent: offers, launch by name from a spec, find, billing) of
`clouds.base`, over httpx with one deadline per call and client-side pacing. The API key goes
only in the Authorization header to its own base URL: never in a log or an exception."""

from __future__ import annotations

import logging
import re
import shlex
from typing import Any

import httpx

from procure.bounds import UnsafeInput, loads
from procure.clouds.base import (
    LABEL_PREFIX,
    AuthError,
    CapacityError,
    CloudError,
    Instance,
    InstanceType,
    LaunchSpec,
    Offer,
    Provider,
    ProviderError,
    RateLimited,
    without_secrets,
)
from procure.clouds.lambda_cloud import wire
from procure.clouds.lambda_cloud.pacing import Pacer
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.httpbounds import bounded_client
from procure.safetext import remember_secret

log = logging.getLogger(__name__)
MAX_NAME = 64  # Lambda's limit on an instance name
GONE = {"terminating", "terminated", "preempted"}
ENDED = {"terminating", "terminated"}
TAG = {"key": "managed-by", "value": "procure"}  # marks procure's instances in Lambda's console
MAX_USER_DATA = 1024 * 1024  # Lambda's limit on user_data
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class LambdaCloud:
    """One account's client. `transport` routes requests elsewhere (tests); `pacer` spaces
    them (default: Lambda's published limits on the wall clock)."""

    provider: Provider = "lambda"
    billing_increment_s: int = wire.BILLING_INCREMENT_S
    lost_bills_disk = False  # a preempted instance is gone with its disk (listed, not billed)
    bills_boot = False  # billing starts once the instance is booted, by the minute

    def __init__(
        self,
        settings: LambdaSettings | None = None,
        *,
        pacer: Pacer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = settings or LambdaSettings()
        self._key = settings.api_key.get_secret_value() if settings.api_key else ""
        remember_secret(self._key)  # never shown back, whoever echoes it
        self.base_url = settings.api_url.rstrip("/")
        self.pacer = pacer or Pacer()
        self.ssh_key_name = settings.ssh_key_name
        self.node_port = settings.node_port
        headers = {"Accept": "application/json", "User-Agent": "procure"}
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
        return wire.instances(await self._call("GET", "/api/v1/instances"), self.node_port)

    async def instance(self, instance_id: str) -> Instance | None:
        """One instance, or None when Lambda does not know it (any more)."""
        try:
            body = await self._call("GET", f"/api/v1/instances/{_segment(instance_id)}")
        except _NotFound:
            return None
        return wire.one_instance(body, self.node_port)

    async def find_by_name(self, name: str) -> list[Instance]:
        """Instances named `name`: how a launch retried after a crash finds what it launched."""
        return [i for i in await self.instances() if i.name == name]

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        """Launch one instance named `name`; nothing when `instance_type` costs more now than
        `max_price_per_hour`, the price the caps were checked against (CapacityError): Lambda's
        list prices move too, and its launch takes no price to hold."""
        if len(name) > MAX_NAME:
            raise CloudError(f"instance name longer than Lambda's {MAX_NAME} characters")
        if max_price_per_hour is not None:
            now = {t.name: t.price_per_hour for t in await self.instance_types()}
            price = now.get(instance_type)
            if price is not None and price > max_price_per_hour:
                raise CapacityError(
                    f"Lambda's {instance_type} costs {price / 1e6:.4f}/h now, above the "
                    f"{max_price_per_hour / 1e6:.4f}/h the caps were checked against"
                )
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

    # --- RentalCloud: the agent's view ---------------------------------------------------

    async def offers(self, *, gpu: str | None = None, gpu_count: int | None = None) -> list[Offer]:
        """One offer per GPU instance type and region with capacity now, cheapest first. Lambda
        says only whether a region has capacity, so `available` is 1."""
        found = [
            Offer(
                provider="lambda",
                offer_id=t.name,
                gpu=wire.gpu_of(t.name),
                gpu_count=t.gpus,
                region=region,
                price_per_hour=t.price_per_hour,
                interruptible=False,  # Lambda sells no spot or bid instances
                available=1,
                billing_increment_s=self.billing_increment_s,
            )
            for t in await self.instance_types()
            if t.gpus > 0 and wire.gpu_of(t.name)
            for region in t.regions_with_capacity
        ]
        if gpu:
            found = [o for o in found if o.gpu == gpu.strip().upper()]
        if gpu_count is not None:
            found = [o for o in found if o.gpu_count == gpu_count]
        return sorted(found, key=lambda o: (o.price_per_hour, o.gpu_count, o.offer_id, o.region))

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        """Launch one instance named `spec.name` and tagged as procure's, with `user_data`
        exporting `spec.env` before `spec.startup_script` (see `user_data`). Not idempotent:
        callers `find(spec.name)` first. The instance is booting; `get` follows it."""
        if not spec.name.startswith(LABEL_PREFIX):
            raise CloudError(f"an instance procure launches is named {LABEL_PREFIX}…")
        if spec.offer.provider != "lambda":
            raise CloudError(f"an offer of {spec.offer.provider} cannot launch on Lambda")
        if len(spec.name) > MAX_NAME:
            raise CloudError(f"instance name longer than Lambda's {MAX_NAME} characters")
        body: dict[str, Any] = {
            "region_name": spec.offer.region,
            "instance_type_name": spec.offer.offer_id,
            "ssh_key_names": [self.ssh_key_name],
            "name": spec.name,
            "tags": [TAG],
        }
        script = user_data(spec)
        if script is not None:
            body["user_data"] = script
        path = "/api/v1/instance-operations/launch"
        # Its values (the node's token) are secrets sent: one a refusal quotes is never logged.
        remember_secret(*spec.env.values())
        try:
            answer = await self._call("POST", path, body, launch=True)
        except CloudError as exc:
            raise without_secrets(exc, spec.env.values()) from None
        ids = wire.launched_ids(answer)
        log.info(
            "launched %s (%s in %s) as %s",
            spec.name,
            spec.offer.offer_id,
            spec.offer.region,
            ", ".join(ids),
        )
        return Instance(
            id=ids[0],
            name=spec.name,
            status="booting",
            instance_type=spec.offer.offer_id,
            region=spec.offer.region,
            ip=None,
            price_per_hour=spec.offer.price_per_hour,
            gpus=spec.offer.gpu_count,
            gpu=spec.offer.gpu,
        )

    async def find(self, name: str) -> list[Instance]:
        """Instances named `name` that are not terminating or terminated (Lambda cannot filter
        by name: the whole list is read). A preempted one is returned: its job is lost, and the
        caller must see that rather than launch blind."""
        return [i for i in await self.instances() if i.name == name and i.status not in ENDED]

    async def get(self, instance_id: str) -> Instance | None:
        return await self.instance(instance_id)

    async def labelled(self) -> list[Instance]:
        """Every live instance named with procure's prefix (filtered here: Lambda has no
        server-side filter)."""
        return [
            i
            for i in await self.instances()
            if i.name and i.name.startswith(LABEL_PREFIX) and i.status not in GONE
        ]

    async def billed(self, instance_id: str) -> int | None:
        """None: Lambda has no billing endpoint. Procure computes the cost as Lambda bills it
        (`wire.cost_micros`): the instance type's hourly price / 60 for each minute begun, from
        when the instance is first seen `active` (it passed its health checks) to its
        terminate or preemption; booting is free."""
        _segment(instance_id)
        return None

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
        # On a launch the same code names a resource the launch needs (an SSH key, a region, a
        # type): a refusal whose message says which, never an instance "gone".
        gone = code is not None and code[0] == "global/object-does-not-exist"
        if response.status_code == 404 and gone and not launch:
            raise _NotFound(what)
        found = wire.error_for(
            response.status_code, parsed, what, response.headers.get("retry-after")
        )
        error = without_secrets(found, [self._key])
        if isinstance(error, RateLimited):  # the account is limited: this client waits too
            self.pacer.pause(error.retry_after_s or 1.0)
        log.warning("%s", error)
        raise error

    def _scrub(self, text: str) -> str:
        # A provider or proxy that echoes the request must not put the key in our messages.
        return text.replace(self._key, "***") if self._key else text


def user_data(spec: LaunchSpec) -> str | None:
    """The launch's cloud-init `user_data` (Lambda is a VM: no image, no env field): a bash
    script exporting `spec.env` (`export NAME='value'`, one a line, shell-quoted), then
    `spec.startup_script`. None when there is neither."""
    if not spec.env and not spec.startup_script:
        return None
    lines = ["#!/bin/bash"]
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name) or "\0" in value or "\n" in value:
            raise CloudError(f"not an environment variable procure can export: {name[:40]!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    if spec.startup_script:
        lines.append(spec.startup_script)
    script = "\n".join(lines) + "\n"
    if len(script.encode()) > MAX_USER_DATA:
        raise CloudError("the start-up script is over Lambda's 1 MB user_data limit")
    return script


class _NotFound(CloudError):
    """Lambda's 404 object-does-not-exist (internal: callers see None or an idempotent no-op)."""


def _segment(value: str) -> str:
    if not value or len(value) > 200 or any(c in value for c in "/?#%") or value in (".", ".."):
        raise CloudError("not an instance id")
    return value
