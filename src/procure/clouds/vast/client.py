"""The Vast.ai API client (`Cloud` and `RentalCloud` of `clouds.base`): offers (on-demand and
interruptible bids), launch on an ask, get, find by label, terminate, charges; over httpx with
one deadline per call and per-endpoint pacing. The key goes only in the Authorization header to
its own base URL: never in a log, an exception or a repr."""

from __future__ import annotations

import json
import logging
import time
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
from procure.clouds.vast import wire
from procure.clouds.vast.pacing import Pacer
from procure.clouds.vast.settings import VastSettings
from procure.httpbounds import bounded_client
from procure.safetext import remember_secret

log = logging.getLogger(__name__)
PAGE = 25  # Vast's most instances a page
MAX_PAGES = 200
ASKS_TRIED = 3  # a fleet launch's asks of one type and region, cheapest first
MAX_LABEL = 1024
MAX_ONSTART = 4048  # Vast's limit (longer scripts must be gzipped and base64-encoded)
DISK_GB = 20.0
SEARCH_LIMIT = 500
SEARCH_PAGES = 6  # answers one search reads at most, cheapest first (3,000 asks, ~6 s paced)
MIN_BID, MAX_BID = 0.001, 128.0  # $/h, the spec's bounds on a bid at create


class VastCloud:
    """One Vast.ai account's client. `transport` routes requests elsewhere (tests); `pacer`
    spaces them (default: Vast's per-endpoint intervals times `pace_scale`)."""

    provider: Provider = "vast"
    billing_increment_s: int = wire.BILLING_INCREMENT_S
    lost_bills_disk = True  # an instance stays, billing its disk, until it is destroyed
    bills_boot = True  # billing starts at creation, by the second, the boot included
    # How an operator ends an instance kept stopped (its storage still billed): the fleet says.
    end_kept = (
        "resume it, or destroy instance {id} (Vast.ai's console, or `vastai destroy instance {id}`)"
    )

    def __init__(
        self,
        settings: VastSettings | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        settings = settings or VastSettings()
        self._key = settings.api_key.get_secret_value() if settings.api_key else ""
        remember_secret(self._key)  # never shown back, whoever echoes it
        self.base_url = settings.api_url.rstrip("/")
        self.node_port = settings.node_port
        self.rate_limit_retries = settings.rate_limit_retries
        self.image = settings.image
        self.pacer = pacer or Pacer(settings.pace_scale)
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
        return f"VastCloud({self.base_url!r})"

    # --- RentalCloud ---------------------------------------------------------------------

    async def offers(
        self, *, gpu: str | None = None, gpu_count: int | None = None, spot: bool | None = None
    ) -> list[Offer]:
        """On-demand and interruptible (bid) offers, cheapest first; `spot` picks one kind."""
        found: list[Offer] = []
        model = wire.canonical_gpu(gpu) if gpu else None
        for interruptible in (False, True):
            if spot is not None and spot != interruptible:
                continue
            got, whole = await self._search(interruptible, model, gpu_count)
            found += got
            if model and whole and not any(_fits(o, model, gpu_count) for o in got):
                # The whole market read, none of this model: its bids are the same hosts'
                # (reading them through again would only double the caller's wait).
                break
        if gpu:
            found = [o for o in found if o.gpu == wire.canonical_gpu(gpu)]
        if gpu_count is not None:
            found = [o for o in found if o.gpu_count == gpu_count]
        return sorted(found, key=lambda o: (o.price_per_hour, o.interruptible, o.offer_id))

    async def _search(
        self,
        interruptible: bool,
        gpu: str | None,
        count: int | None = None,
        *,
        every: bool = False,
    ) -> tuple[list[Offer], bool]:
        """The market's cheapest offers of one kind. Vast answers at most SEARCH_LIMIT offers,
        cut in the order asked (by price here: cut in Vast's own order, the cheapest were lost).
        A search for one GPU model whose answer is full of other models goes on from that
        answer's highest price, as does one for `every` model (the fleet's catalogue): Vast's
        search has no page token, and its names for a model are not ours to guess (the model
        is matched here, on canonical names), with `count` GPUs when given (asked of Vast too:
        a one-GPU bundle of the model is not the eight-GPU one looked for). Also whether the
        whole market was read (the last answer was not full). An answer past a price that brings
        nothing new ends the search: Vast did not move past it, and asking again would only make
        the caller wait."""
        body: dict[str, Any] = {
            "limit": SEARCH_LIMIT,
            # The spec's enum says "ondemand"; the SDK sends "on-demand". Vast takes both.
            "type": "bid" if interruptible else "ondemand",
            "verified": {"eq": True},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "direct_port_count": {"gte": 1},
            # Vast prices each ask (`dph_total`) with the disk asked for here, 8 GB unless said:
            # the disk every launch asks for, so the price shown and compared is the one billed.
            "allocated_storage": DISK_GB,
            # Two [field, direction] pairs, as the spec's schema counts them; the id breaks ties.
            "order": [["dph_total", "asc"], ["id", "asc"]],
        }
        if count is not None:
            body["num_gpus"] = {"in": [count]}
        found: dict[str, Offer] = {}
        seen: set[str] = set()
        for _ in range(SEARCH_PAGES):
            answer = await self._call("POST", "/api/v0/bundles/", "search", json_body=body)
            priced = wire.offers(answer, interruptible=interruptible, disk_gb=DISK_GB)
            found |= {o.offer_id: o for o in priced}
            ids, highest = wire.search_page(answer)
            new = set(ids) - seen
            seen |= new
            full = len(ids) >= SEARCH_LIMIT and highest is not None
            if not full:
                return list(found.values()), True
            wanted = every or (
                gpu is not None and not any(_fits(o, gpu, count) for o in found.values())
            )
            if not wanted or (not new and "gt" in body.get("dph_total", {})):
                break
            # Asks priced at the cut come again (`gte`; known ones skipped), unless no ask in
            # the answer was new (a whole answer at one price): then past that price.
            body["dph_total"] = {"gte" if new else "gt": highest}
        return list(found.values()), False

    async def launch_spec(self, spec: LaunchSpec) -> Instance:
        if not spec.name or len(spec.name) > MAX_LABEL:
            raise CloudError(f"a Vast.ai label is 1 to {MAX_LABEL} characters")
        offer = spec.offer
        if offer.provider != "vast":
            raise CloudError(f"a {offer.provider} offer cannot be launched on Vast.ai")
        env = {k: v for k, v in spec.env.items() if not k.startswith("-")}
        env[f"-p {spec.node_port}:{spec.node_port}"] = "1"  # Vast's dict form of a port map
        body: dict[str, Any] = {
            "image": spec.image or self.image,
            "label": spec.name,
            "disk": DISK_GB,
            "env": env,
            # onstart runs after Vast's own entrypoint with the ssh runtypes; with none, the
            # image's entrypoint runs as it is (args runtype).
            "runtype": "ssh_direct" if spec.startup_script else "args",
        }
        if spec.startup_script:
            if len(spec.startup_script) > MAX_ONSTART:
                raise CloudError(f"a Vast.ai onstart script is at most {MAX_ONSTART} characters")
            body["onstart"] = spec.startup_script
        price = offer.price_per_hour
        if offer.interruptible:
            bid = spec.bid_per_hour or offer.min_bid_per_hour or offer.price_per_hour
            dollars = round(bid / wire.MICROS, 6)
            if not MIN_BID <= dollars <= MAX_BID:
                raise CloudError(f"a Vast.ai bid is ${MIN_BID} to ${MAX_BID:g} an hour")
            body["price"] = dollars
            body["cancel_unavail"] = False  # a losing bid waits rather than failing
            # Vast bills the disk beside the bid: the instance's price is both, as its offer's.
            disk = offer.price_per_hour - (offer.min_bid_per_hour or offer.price_per_hour)
            price = bid + max(0, disk)
        path = f"/api/v0/asks/{_segment(offer.offer_id)}/"
        # Never retried here: Vast's create takes no idempotency key. After an error the caller
        # looks for the label (find) before launching again.
        # Its env values (the node's token) are secrets sent: one a refusal quotes is never logged.
        remember_secret(*spec.env.values())
        try:
            answer = await self._call("PUT", path, "create", json_body=body)
        except CloudError as exc:
            raise without_secrets(exc, spec.env.values()) from None
        instance_id = wire.new_contract(answer)
        log.info("launched %s on Vast.ai ask %s as %s", spec.name, offer.offer_id, instance_id)
        return Instance(
            id=instance_id,
            name=spec.name,
            status="booting",
            instance_type=wire.type_name(offer.gpu, offer.gpu_count),
            region=offer.region,
            ip=None,
            price_per_hour=price,
            gpus=offer.gpu_count,
            interruptible=offer.interruptible,
            gpu=offer.gpu,
        )

    async def get(self, instance_id: str) -> Instance | None:
        path = f"/api/v0/instances/{_segment(instance_id)}/"
        try:
            body = await self._call("GET", path, "show")
        except _NotFound:
            return None
        found = wire.one_instance(body, self.node_port)
        return None if found is None or found.status == "terminated" else found

    async def find(self, name: str) -> list[Instance]:
        """Live instances labelled `name` (Vast filters by label on the server)."""
        found = await self._list({"label": {"eq": name}})
        return [i for i in found if i.name == name]

    async def labelled(self) -> list[Instance]:
        return [i for i in await self._list({}) if (i.name or "").startswith(LABEL_PREFIX)]

    async def terminate(self, instance_ids: list[str]) -> list[Instance]:
        """Destroy each; one Vast no longer has (404 not_found) is not an error, so a retry
        after a crash is harmless."""
        gone: list[Instance] = []
        for instance_id in instance_ids:
            path = f"/api/v0/instances/{_segment(instance_id)}/"
            try:
                body = await self._call("DELETE", path, "destroy")
            except _NotFound:
                continue
            if isinstance(body, dict) and body.get("success") is False:  # still runs and bills
                _, message = wire.error_text(body, b"")
                raise ProviderError(f"destroy: Vast.ai did not destroy {instance_id}: {message}")
            gone.append(Instance(instance_id, None, "terminating", "", "", None, 0, gpus=0))
        return gone

    async def billed(self, instance_id: str) -> int | None:
        """Micro-USD Vast has charged this instance (its `instance-<id>` row of the charges),
        None when it has no charge yet. Charges are rounded to 3 decimals by Vast."""
        _segment(instance_id)
        # The day range is required; every contract this account could have is inside it.
        filters = {"day": {"gte": 0, "lte": int(time.time()) + 400 * 86400}}
        params: dict[str, str] = {"select_filters": json.dumps(filters), "limit": "500"}
        total: int | None = None
        tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            # Vast's SDK's path keeps its trailing slash, as every other call here does.
            body = await self._call("GET", "/api/v0/charges/", "charges", params=params)
            amount, token = wire.charges_page(body, instance_id)
            if amount is not None:
                total = (total or 0) + amount
            if not token:
                return total
            params["after_token"] = _next_page(token, tokens, "charges")
        raise ProviderError("Vast.ai's charges did not end within the pages allowed")

    # --- Cloud (the fleet controller) ----------------------------------------------------

    async def instance_types(self) -> list[InstanceType]:
        """One type per GPU model and count, at its cheapest on-demand offer, with the regions
        where one can be rented now."""
        # The whole market: its cheapest answer may hold none of a model the fleet runs.
        return list(_types((await self._search(False, None, every=True))[0]).values())

    async def instance_type(self, name: str) -> InstanceType | None:
        """One type, read by its GPU model and count: the catalogue, read by price from the
        cheapest ask for SEARCH_PAGES answers, misses a type priced past them (eight H100s)."""
        gpu, count = wire.gpu_of_type(name), wire.count_of_type(name)
        if gpu is None or count is None:
            return None
        return _types(await self.offers(gpu=gpu, gpu_count=count, spot=False)).get(name)

    async def instances(self) -> list[Instance]:
        return await self._list({})

    async def launch(
        self,
        *,
        instance_type: str,
        region: str,
        name: str,
        ssh_key_names: list[str],
        max_price_per_hour: int | None = None,
    ) -> list[str]:
        """Rent the cheapest on-demand offer of this type at or under the price checked, in this
        region, else in another (the type's price is its cheapest ask anywhere; Vast.ai's
        regions are its hosts' locations), cheapest first (Vast has no SSH key names at launch:
        the account's keys apply); an ask another renter took in between is followed by the
        next (the create never happened)."""
        fits = [
            o
            # Searched by its model: the market's cheapest answer may hold none of this type.
            for o in await self.offers(
                gpu=wire.gpu_of_type(instance_type),
                gpu_count=wire.count_of_type(instance_type),
                spot=False,
            )
            if wire.type_name(o.gpu, o.gpu_count) == instance_type
            and (max_price_per_hour is None or o.price_per_hour <= max_price_per_hour)
        ]
        candidates = sorted(fits, key=lambda o: (o.region != region, o.price_per_hour))
        if not candidates:
            under = f" at or under {max_price_per_hour / 1e6:.4f}/h" if max_price_per_hour else ""
            raise CapacityError(f"Vast.ai has no {instance_type} offer{under} now")
        for offer in candidates[:ASKS_TRIED]:
            spec = LaunchSpec(name=name, offer=offer, node_port=self.node_port)
            try:
                return [(await self.launch_spec(spec)).id]
            except CapacityError as exc:  # that ask is gone: nothing was created
                taken = exc
        raise taken

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- the wire --------------------------------------------------------------------------

    async def _list(self, filters: dict[str, Any]) -> list[Instance]:
        params = {"limit": str(PAGE), "select_filters": json.dumps(filters)}
        found: list[Instance] = []
        tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            body = await self._call("GET", "/api/v1/instances/", "list", params=params)
            page, token = wire.instances_page(body, self.node_port)
            found += [i for i in page if i.status != "terminated"]
            if not token:
                return found
            params["after_token"] = _next_page(token, tokens, "instance list")
        raise ProviderError("Vast.ai's instance list did not end within the pages allowed")

    async def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """One call; a 429 is waited out (the pacer's back-off: Vast sends no Retry-After) and
        tried again, `rate_limit_retries` times, as Vast's own SDK does."""
        for attempt in range(self.rate_limit_retries + 1):
            try:
                return await self._call_once(
                    method, path, endpoint, json_body=json_body, params=params
                )
            except RateLimited as exc:
                if attempt >= self.rate_limit_retries or (exc.retry_after_s or 0) > 30:
                    log.warning("%s", exc)  # given up on: the caller sees it
                    raise
        raise AssertionError("unreachable")

    async def _call_once(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        what = f"{method} {path}"
        if not self._key:
            raise AuthError(f"{what}: VAST_API_KEY is not set")
        await self.pacer.wait(endpoint)
        try:
            response = await self._http.request(method, path, json=json_body, params=params)
        except httpx.TimeoutException:
            raise ProviderError(f"{what}: Vast.ai gave no complete answer in time") from None
        except httpx.HTTPError as exc:
            raise ProviderError(self._scrub(f"{what}: {type(exc).__name__}: {exc}")) from None
        try:
            parsed = loads(response.content) if response.content else None
        except UnsafeInput:
            parsed = None
        if response.is_success:
            self.pacer.ok(endpoint)
            if parsed is None:
                raise ProviderError(f"{what}: Vast.ai answered {response.status_code} with no JSON")
            return parsed
        found = wire.error_for(response.status_code, parsed, response.content, what)
        # Only Vast's own "not found" means gone: a proxy's or a retired path's 404 does not.
        gone = wire.error_text(parsed, response.content)[0] == "not_found"
        if response.status_code == 404 and endpoint in ("show", "destroy") and gone:
            raise _NotFound(what)
        if isinstance(found, RateLimited):
            backoff = self.pacer.limited(endpoint, wire.threshold_s(str(found)))
            error: CloudError = RateLimited(self._scrub(str(found)), retry_after_s=backoff)
        else:
            error = type(found)(self._scrub(str(found)))
        # A 429 is waited out and tried again (`_call`): a warning only once it is given up on.
        log.log(logging.INFO if isinstance(error, RateLimited) else logging.WARNING, "%s", error)
        raise error

    def _scrub(self, text: str) -> str:
        # A provider or proxy that echoes the request must not put the key in our messages.
        return text.replace(self._key, "***") if self._key else text


class _NotFound(CloudError):
    """Vast's 404 for an instance (internal: callers see None or an idempotent no-op)."""


def _types(offers: list[Offer]) -> dict[str, InstanceType]:
    """One type per GPU model and count, at its cheapest on-demand offer, with its regions."""
    types: dict[str, InstanceType] = {}
    for o in offers:
        if o.interruptible:
            continue
        name = wire.type_name(o.gpu, o.gpu_count)
        seen = types.get(name)
        regions = sorted({*(seen.regions_with_capacity if seen else []), o.region})
        price = min(o.price_per_hour, seen.price_per_hour) if seen else o.price_per_hour
        types[name] = InstanceType(
            name, f"{o.gpu_count}x {o.gpu} on Vast.ai", o.gpu_count, price, regions
        )
    return types


def _fits(offer: Offer, gpu: str, count: int | None) -> bool:
    return offer.gpu == gpu and (count is None or offer.gpu_count == count)


def _next_page(token: str, seen: set[str], what: str) -> str:
    """`token`, the next page's cursor, unless Vast handed it out before: a cursor that loops
    would be followed page after paced page to the limit, stalling the caller for minutes."""
    if token in seen:
        raise ProviderError(f"Vast.ai's {what} pages loop (a next_token came back again)")
    seen.add(token)
    return token


def _segment(value: str) -> str:
    # Vast's ids are integers; anything else must not be spliced into a path.
    if not value.isascii() or not value.isdecimal() or len(value) > 19:
        raise CloudError("not a Vast.ai id")
    return value
