"""The RunPod REST v2 client (`Cloud` and `RentalCloud` of `clouds.base`): offers from the GPU
catalog, pods launched by name, read, listed and deleted, and per-pod billing, over httpx with
one deadline per call and pacing by RunPod's 429s. The key goes only in the Authorization header
to the configured base URL: never in a log, an exception or a repr."""

from __future__ import annotations

import logging
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
from procure.clouds.runpod import wire
from procure.clouds.runpod.pacing import Pacer
from procure.clouds.runpod.settings import RunPodSettings
from procure.httpbounds import bounded_client
from procure.safetext import remember_secret

log = logging.getLogger(__name__)
MAX_NAME = 191  # v1's limit on a pod name; v2 documents none
PODS = "/v2/pods"


class RunPodCloud:
    """One account's client. `transport` routes requests elsewhere (tests); `pacer` spaces them
    and honours RunPod's Retry-After."""

    provider: Provider = "runpod"
    billing_increment_s = wire.BILLING_INCREMENT_S
    lost_bills_disk = True  # a pod stays, billing its volume disk, until it is terminated
    bills_boot = True  # billing starts at creation, by the second, the boot included
    # How an operator ends a pod kept EXITED (its volume still billed): the fleet says so.
    end_kept = "resume it, or terminate pod {id} (RunPod's console, or `runpodctl remove pod {id}`)"

    def __init__(
        self,
        settings: RunPodSettings | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.settings = settings or RunPodSettings()
        self._key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        remember_secret(self._key)  # never shown back, whoever echoes it
        self.base_url = self.settings.api_url.rstrip("/")
        self.pacer = pacer or Pacer()
        headers = {"Accept": "application/json", "User-Agent": "procure"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = bounded_client(
            deadline_s=self.settings.timeout_s,
            transport=transport,
            base_url=self.base_url,
            headers=headers,
            follow_redirects=False,  # a redirect could carry the key to another host
        )

    def __repr__(self) -> str:
        return f"RunPodCloud({self.base_url!r})"

    # --- RentalCloud -----------------------------------------------------------------------

    async def offers(self, *, gpu: str | None = None, gpu_count: int | None = None) -> list[Offer]:
        """Offers of pods of `gpu_count` GPUs (RunPod's catalogue prices and stocks one count
        at a time: one GPU when not given)."""
        gpu_count = gpu_count or 1
        found: list[Offer] = []
        for cloud in wire.CLOUDS:
            params = {"include": "AVAILABILITY", "product": "POD", "cloud": cloud}
            if gpu_count != 1:
                params["count"] = str(gpu_count)
            body = await self._call("GET", "/v2/catalog/gpus", params=params)
            found += wire.offers(body, cloud, gpu_count)
        if gpu:
            found = [o for o in found if o.gpu == gpu.upper()]
        return sorted(found, key=lambda o: (o.price_per_hour, -o.available, o.offer_id, o.region))

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        if not spec.name or len(spec.name) > MAX_NAME:
            raise CloudError(f"a pod name must have 1 to {MAX_NAME} characters")
        cloud, gpu_id = wire.parse_offer_id(spec.offer.offer_id)
        body: dict[str, Any] = {
            "name": spec.name,
            "image": spec.image or self.settings.image,
            "env": dict(spec.env),
            "ports": [f"{spec.node_port}/tcp"],
            "gpu": {"id": gpu_id, "count": max(1, spec.offer.gpu_count)},
            "cloud": cloud,
        }
        if spec.startup_script:
            body["args"] = spec.startup_script
        if spec.offer.region:
            body["dataCenterIds"] = [spec.offer.region]
        # Never retried here: createPod takes no idempotency key. After an error the caller
        # looks for the name (`find`) before it launches again.
        # Its env values (the node's token) are secrets sent: one a refusal quotes is never logged.
        remember_secret(*spec.env.values())
        try:
            answer = await self._call("POST", PODS, json=body, create=True)
        except CloudError as exc:
            raise without_secrets(exc, spec.env.values()) from None
        launched = wire.instance(answer, spec.node_port)
        log.info("launched %s (%s in %s) as %s", spec.name, gpu_id, launched.region, launched.id)
        return launched

    async def get(self, instance_id: str) -> Instance | None:
        """One pod, or None when RunPod no longer knows it (deleted pods answer 404)."""
        try:
            body = await self._call("GET", f"{PODS}/{_segment(instance_id)}")
        except _NotFound:
            return None
        return wire.instance(body, self.settings.node_port)

    async def find(self, name: str) -> list[Instance]:
        # v2 has no server-side name filter: list and match here.
        return [i for i in await self.instances() if i.name == name]

    async def labelled(self) -> list[Instance]:
        return [i for i in await self.instances() if (i.name or "").startswith(LABEL_PREFIX)]

    async def billed(self, instance_id: str) -> int | None:
        # Yearly buckets from two New Years ago: the whole life of any pod procure could run
        # (months would cut a long-running pod's first ones off), in three records at most.
        params = {"podId": instance_id, "bucketSize": "year", "lastN": "3"}
        return wire.billed(await self._call("GET", "/v2/billing/pods", params=params), instance_id)

    # --- Cloud (the fleet controller) ------------------------------------------------------

    async def instance_types(self) -> list[InstanceType]:
        by_type: dict[str, list[Offer]] = {}
        for offer in await self.offers():
            by_type.setdefault(offer.offer_id, []).append(offer)
        return [
            InstanceType(
                name=name,
                description=f"{group[0].gpu_count}x {group[0].gpu} ({name.split(':', 1)[0]})",
                gpus=group[0].gpu_count,
                price_per_hour=group[0].price_per_hour,
                regions_with_capacity=sorted({o.region for o in group}),
            )
            for name, group in by_type.items()
        ]

    async def instances(self) -> list[Instance]:
        found = wire.pods(await self._call("GET", PODS), self.settings.node_port)
        return [i for i in found if i.status != "terminated"]

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        """A fleet launch: one pod of `instance_type` (an offer id) in data centre `region`, if
        its price now is at most `max_price_per_hour` (RunPod's create takes no price: it is
        read first). RunPod puts the account's registered SSH keys on a pod itself;
        `ssh_key_names` is unused."""
        _cloud, gpu_id = wire.parse_offer_id(instance_type)
        if max_price_per_hour is not None:
            now = [o for o in await self.offers() if o.offer_id == instance_type]
            if not now or min(o.price_per_hour for o in now) > max_price_per_hour:
                price = f"{min(o.price_per_hour for o in now) / 1e6:.4f}/h" if now else "none"
                raise CapacityError(
                    f"RunPod's {instance_type} costs {price} now, above the "
                    f"{max_price_per_hour / 1e6:.4f}/h the caps were checked against"
                )
        offer = Offer(
            provider="runpod",
            offer_id=instance_type,
            gpu=wire.canonical_gpu(gpu_id),
            gpu_count=1,
            region=region,
            price_per_hour=0,
            interruptible=False,
            available=1,
            billing_increment_s=self.billing_increment_s,
        )
        spec = LaunchSpec(name=name, offer=offer, node_port=self.settings.node_port)
        return [(await self.launch_spec(spec)).id]

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        """Delete each pod; one already gone (404) is not an error, so a retry is harmless."""
        ended: list[Instance] = []
        for instance_id in instance_ids:
            try:
                before = await self.get(instance_id)
            except ProviderError:  # unreadable (an unknown status): end it all the same
                before = Instance(instance_id, None, "terminated", "", "", None, 0)
            if before is None:
                continue
            try:
                await self._call("DELETE", f"{PODS}/{_segment(instance_id)}")
            except _NotFound:
                continue  # gone in between
            ended.append(_ended(before))
        return ended

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- the wire --------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        create: bool = False,
    ) -> Any:
        what = f"{method} {path}"
        if not self._key:
            raise AuthError(f"{what}: RUNPOD_API_KEY is not set")
        await self.pacer.wait()
        try:
            response = await self._http.request(method, path, params=params, json=json)
        except httpx.TimeoutException:
            raise ProviderError(f"{what}: RunPod gave no complete answer in time") from None
        except httpx.HTTPError as exc:
            detail = self._scrub(f"{type(exc).__name__}: {exc}")
            raise ProviderError(f"{what}: {detail}") from None
        exhausted = wire.exhausted_for(response.headers.get("ratelimit"))
        if exhausted:
            self.pacer.pause(exhausted)
        try:
            parsed = loads(response.content) if response.content else None
        except UnsafeInput:
            parsed = None
        if response.is_success:
            if response.status_code == 204 or method == "DELETE":
                return None
            if parsed is None:
                raise ProviderError(f"{what}: RunPod answered {response.status_code} with no JSON")
            return parsed
        # Only a pod's own path answering 404 means the pod is gone; createPod's 404 (a
        # template or volume it names) is a refusal whose detail says what is missing.
        one_pod = path.startswith(f"{PODS}/")
        if response.status_code == 404 and one_pod and wire.problem(parsed)[0]:
            raise _NotFound(what)
        after = response.headers.get("retry-after")
        found = wire.error_for(response.status_code, parsed, what, create=create, after=after)
        if isinstance(found, RateLimited):
            error: CloudError = RateLimited(self._scrub(str(found)), found.retry_after_s)
            self.pacer.pause(found.retry_after_s if found.retry_after_s is not None else 1.0)
        else:
            error = type(found)(self._scrub(str(found)))
        log.warning("%s", error)
        raise error

    def _scrub(self, text: str) -> str:
        # A provider or proxy that echoes the request must not put the key in our messages.
        return text.replace(self._key, "***") if self._key else text


class _NotFound(CloudError):
    """RunPod's 404 (internal: callers see None or an idempotent no-op)."""


def _ended(inst: Instance) -> Instance:
    return Instance(
        id=inst.id,
        name=inst.name,
        status="terminated",
        instance_type=inst.instance_type,
        region=inst.region,
        ip=None,
        price_per_hour=0,
        gpus=inst.gpus,
        node_url=None,
        interruptible=False,
        gpu=inst.gpu,
    )


def _segment(value: str) -> str:
    if not value or len(value) > 200 or any(c in value for c in "/?#% ") or value in (".", ".."):
        raise CloudError("not a pod id")
    return value
