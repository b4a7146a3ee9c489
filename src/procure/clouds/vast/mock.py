"""The mock Vast.ai (`procure mock-cloud --provider vast`): Vast's paths (trailing slashes kept,
no redirects), auth, JSON and error shapes, checked against Vast's spec, over `MockVastState`;
each instance hosts a real GPU node. Admin endpoints (Bearer <api key>) move the clock, inject
faults, preempt (outbid a bid; kill an on-demand host), set capacity and read the billing.

Faults (`POST /admin/faults`), each for one endpoint (`search`, `create`, `show`, `list`,
`destroy`, `charges`) or all, `count` times (null: until cleared): `status` (an error answer),
`hang_s`, `garbage`, `huge`, `rate_limit` (Vast's 429: no Retry-After); and switches
`unknown_status`, `never_boot`, `wrong_ip`; `clear` drops them all."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from procure.asgibounds import BoundedRequests, answer_invalid_requests
from procure.bearer import bearer_matches
from procure.clouds.mockworld import faults as mockfaults
from procure.clouds.mockworld import server as mockserver
from procure.clouds.specs import SpecError, validate_request
from procure.clouds.vast import mockio
from procure.clouds.vast.mockjson import charge_json, instance_json, offer_json
from procure.clouds.vast.mockstate import (
    DEFAULT_DISK_GB,
    MockVastConfig,
    MockVastState,
    Refusal,
    refusal,
)
from procure.clouds.vast.nodes import node_keeper

PAGE_MAX = 25
HUGE_BYTES = 3 << 20  # past what procure's clients read


class FaultBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    endpoint: str | None = Field(None, max_length=20)
    count: int | None = Field(1, ge=1, le=1_000_000)
    status: int | None = Field(None, ge=400, le=599)
    hang_s: float = Field(0.0, ge=0, le=600)
    garbage: bool = False
    huge: bool = False
    rate_limit: bool = False
    unknown_status: bool | None = None
    never_boot: bool | None = None
    wrong_ip: bool | None = None
    clear: bool = False


class CapacityBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=0, le=10_000)
    offer_id: int | None = None
    gpu: str | None = Field(None, max_length=100)
    region: str | None = Field(None, max_length=200)


def _error(r: Refusal) -> Response:
    if isinstance(r.body, str):
        return PlainTextResponse(r.body, r.status)
    return JSONResponse(r.body, r.status)


def create_app(state: MockVastState) -> FastAPI:
    config = state.config
    nodes = node_keeper(state)
    rules: list[FaultBody] = []

    # Vast's state moves on as it is read: the step only takes the nodes of outbid instances
    # and dead hosts down.
    lifespan = mockserver.stepping("mock Vast.ai", nodes, with_nodes=config.nodes)
    app = FastAPI(
        title="procure mock Vast.ai",
        description="Vast.ai's API on a simulated clock, with simulated GPU nodes.",
        lifespan=lifespan,
        redirect_slashes=False,  # Vast's clients follow no redirects
    )
    app.add_middleware(BoundedRequests)
    # Vast's word for arguments it cannot take, naming the field, never quoting it (FastAPI's
    # own answer could not render NaN: a 500).
    answer_invalid_requests(
        app, lambda found: _error(refusal(400, "invalid_args", "; ".join(found)))
    )
    app.state.cloud = state
    app.state.nodes = nodes

    @app.exception_handler(Refusal)
    async def refused(_request: Request, exc: Refusal) -> Response:
        return _error(exc)

    def authorised(request: Request) -> str:
        given = request.headers.get("authorization")
        if not bearer_matches(given, config.api_key):
            # Vast's word for a refused key (its spec); `invalid_token` is a stale page cursor.
            raise refusal(401, "auth_error", "Invalid user key")
        return f"{config.api_key}@{request.client.host if request.client else ''}"

    async def provider(
        request: Request, endpoint: str, answer: Callable[[], Awaitable[Any]], *, auth: bool = True
    ) -> Response:
        """Auth, then an injected fault, then Vast's rate limit, then the answer."""
        identity = (
            authorised(request) if auth else f"@{request.client.host if request.client else ''}"
        )
        rule = next((r for r in rules if r.endpoint in (None, endpoint)), None)
        if rule is not None:
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    rules.remove(rule)
            if rule.hang_s:
                await asyncio.sleep(rule.hang_s)
            if rule.rate_limit:
                limit = config.rate_limits_s.get(endpoint, 1.0) * (config.rate_scale or 1.0)
                raise mockio.too_frequent(endpoint, limit)
            if rule.status:
                code = "server_error" if rule.status >= 500 else "invalid_args"
                raise refusal(rule.status, code, f"injected {rule.status}")
            if rule.garbage:
                return mockfaults.garbage()
            if rule.huge:
                return mockfaults.huge("pad", HUGE_BYTES, media_type="application/json")
        threshold = state.too_soon(endpoint, identity)
        if threshold is not None:
            raise mockio.too_frequent(endpoint, threshold)
        return JSONResponse(await answer())

    def route(path: str, method: str, fn: Callable[..., Any]) -> None:
        # Vast's paths end in a slash; the slashless form answers too, never by a redirect.
        app.add_api_route(path, fn, methods=[method], include_in_schema=path.endswith("/"))
        app.add_api_route(path.rstrip("/"), fn, methods=[method], include_in_schema=False)

    async def search(request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            body = await mockio.body_json(request)
            kind = body.get("type", "ondemand")
            # The spec's enum says "ondemand", its example and the SDK "on-demand": both go.
            checked = {k: v for k, v in body.items() if k != "order"}
            if kind == "on-demand":
                checked["type"] = "ondemand"
            try:
                validate_request("vast", "post", "/api/v0/bundles", checked)
            except SpecError as exc:
                raise refusal(400, "invalid_args", str(exc)[:300]) from None
            bid = kind == "bid"
            # Vast prices each ask with the disk asked for: 8 GB unless the search says.
            disk = _disk(body.get("allocated_storage"))
            with state.lock:
                now = state.now()
                offers = [
                    offer_json(state, m, now, bid=bid, disk_gb=disk)
                    for m in config.machines
                    if state.free(m, now) > 0
                ]
            skip = {"limit", "type", "order", "allocated_storage"}
            filters = {k: v for k, v in body.items() if k not in skip}
            if isinstance(filters.get("gpu_name"), dict):  # Vast's docs write "RTX_4090"
                filters["gpu_name"] = mockio.spaced(filters["gpu_name"])
            offers = [
                o
                for o in offers
                if all(mockio.match(o.get(k), c) for k, c in filters.items() if k in o)
            ]
            order = body.get("order")
            if isinstance(order, list):
                for entry in reversed(order):
                    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
                        offers.sort(
                            key=lambda o, f=entry[0]: (o.get(f) is None, o.get(f) or 0),
                            reverse=entry[1] == "desc",
                        )
            limit = body.get("limit")
            if isinstance(limit, int) and limit > 0:
                offers = offers[:limit]
            return {"offers": offers}

        return await provider(request, "search", answer, auth=False)

    async def create(request: Request, ask_id: str) -> Response:
        async def answer() -> dict[str, Any]:
            offer = mockio.int_id(ask_id)
            body = await mockio.body_json(request)
            env = body.get("env", {})
            if isinstance(env, dict):
                # Vast takes env as a dict (docs, SDK); the spec types it as a Docker-flag string.
                if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
                    raise refusal(400, "invalid_args", "env values must be strings")
                checked = {k: v for k, v in body.items() if k != "env"}
            else:
                checked, env = body, mockio.parse_env(env)
            try:
                validate_request("vast", "put", "/api/v0/asks/{id}", checked)
            except SpecError as exc:
                code = "invalid_price" if "price" in str(exc) else "invalid_args"
                raise refusal(400, code, str(exc)[:300], ask_id=offer) from None
            inst = await asyncio.to_thread(
                state.create,
                offer,
                label=str(body.get("label") or ""),
                image=body["image"],
                env=env,
                onstart=body.get("onstart"),
                runtype=str(body.get("runtype") or "ssh"),
                price=body.get("price"),
                cancel_unavail=body.get("cancel_unavail", None if "price" in body else True),
                disk_gb=_disk(body.get("disk")),
            )
            if config.nodes:
                await nodes.reconcile()  # its node is bound now; it answers once running
            return {"success": True, "new_contract": inst.id}

        return await provider(request, "create", answer)

    async def show(request: Request, instance_id: str) -> Response:
        async def answer() -> dict[str, Any]:
            wanted = mockio.int_id(instance_id)
            with state.lock:
                now = state.now()
                inst = next((i for i in state.visible(now) if i.id == wanted), None)
                # As Vast: an instance it no longer has reads `{"instances": null}`.
                return {
                    "instances": instance_json(state, inst, now, listing=False) if inst else None
                }

        return await provider(request, "show", answer)

    async def listing(request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            q = request.query_params
            limit_raw = q.get("limit", str(PAGE_MAX))
            if _integer(limit_raw) and int(limit_raw) <= 0:
                limit_raw = "5"  # as Vast's spec says: "Values ≤ 0 are treated as 5"
            if not limit_raw.isdecimal() or not 0 < int(limit_raw) <= PAGE_MAX:
                raise refusal(400, "invalid_request", f"limit must be at most {PAGE_MAX}")
            filters = mockio.filters(q.get("select_filters"), "select_filters")
            after = mockio.after(q.get("after_token"))
            with state.lock:
                now = state.now()
                rows = [
                    instance_json(state, i, now, listing=True)
                    for i in sorted(state.visible(now), key=lambda i: i.id)
                ]
            rows = [r for r in rows if all(mockio.match(r.get(k), c) for k, c in filters.items())]
            labels: dict[str, int] = {}
            for r in rows:
                labels[r["label"] or ""] = labels.get(r["label"] or "", 0) + 1
            page = [r for r in rows if r["id"] > after][: int(limit_raw)]
            more = page and any(r["id"] > page[-1]["id"] for r in rows)
            return {
                "success": True,
                "instances_found": len(page),
                "total_instances": len(rows),
                "label_counts": labels,
                "next_token": mockio.token(page[-1]["id"]) if more else None,
                "instances": page,
            }

        return await provider(request, "list", answer)

    async def destroy(request: Request, instance_id: str) -> Response:
        async def answer() -> dict[str, Any]:
            await asyncio.to_thread(state.destroy, mockio.int_id(instance_id))
            if config.nodes:
                await nodes.reconcile()
            return {"success": True, "msg": "Instance destroyed successfully"}

        return await provider(request, "destroy", answer)

    async def charges(request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            q = request.query_params
            filters = mockio.filters(q.get("select_filters"), "select_filters", required=True)
            day = filters.get("day")
            if not isinstance(day, dict) or not {"gte", "lte"} <= set(day):
                # Vast's own words (its spec): both ends, or a 400 without an error code.
                msg = "Must provide both 'day' gte and lte filters for instance charges"
                raise Refusal(400, {"success": False, "msg": msg})
            limit_raw = q.get("limit", "100")
            if not limit_raw.isdecimal() or not 0 < int(limit_raw) <= 500:
                raise refusal(400, "invalid_args", "limit must be 1 to 500")
            after = mockio.after(q.get("after_token"))
            with state.lock:
                now = state.now()
                rows = [
                    charge_json(state, i, now)
                    for i in sorted(state.instances.values(), key=lambda i: i.id)
                    if i.running_at <= now and not i.never_boot
                ]
            lo, hi = day.get("gte", float("-inf")), day.get("lte", float("inf"))
            rows = [r for r in rows if mockio.overlaps(r, lo, hi)]
            kinds = filters.get("type")
            if kinds is not None:
                rows = [r for r in rows if mockio.match(r["type"], kinds)]
            ids = [int(r["source"].split("-")[1]) for r in rows]
            page = [r for r, i in zip(rows, ids, strict=True) if i > after][: int(limit_raw)]
            last = int(page[-1]["source"].split("-")[1]) if page else 0
            more = page and any(i > last for i in ids)
            return {
                "success": True,
                "count": len(page),
                "total": len(rows),
                "next_token": mockio.token(last) if more else None,
                "results": page,
            }

        return await provider(request, "charges", answer)

    route("/api/v0/bundles/", "POST", search)
    route("/api/v0/asks/{ask_id}/", "PUT", create)
    route("/api/v0/instances/{instance_id}/", "GET", show)
    route("/api/v0/instances/{instance_id}/", "DELETE", destroy)
    route("/api/v1/instances/", "GET", listing)
    route("/api/v0/charges/", "GET", charges)

    # --- admin (not Vast's API) ----------------------------------------------------------

    @app.get("/admin/state")
    async def admin_state(request: Request) -> dict[str, Any]:
        authorised(request)
        with state.lock:
            now = state.now()
            return {
                "now_s": round(now, 3),
                "speed": state.clock.speed,
                "host_port": config.host_port,
                "rate_limited": state.rate_limited,
                "faults": [r.model_dump() for r in rules],
                "instances": [
                    {
                        "id": str(i.id),
                        "name": i.label,
                        "status": state.actual_status(i, now) or "created",
                        "is_bid": i.is_bid,
                        "price": i.price,
                        "ip": i.ip,
                        "node": f"http://{i.ip}:{config.host_port}" if i.ip else None,
                        "billedMicroUsd": state.billed_micros(i, now),
                    }
                    for i in state.instances.values()
                ],
            }

    @app.post("/admin/faults")
    async def admin_faults(request: Request, body: FaultBody) -> dict[str, Any]:
        authorised(request)
        if body.clear:
            rules.clear()
            state.unknown_status = state.never_boot = state.wrong_ip = False
        for flag in ("unknown_status", "never_boot", "wrong_ip"):
            if getattr(body, flag) is not None:
                setattr(state, flag, getattr(body, flag))
        if body.status or body.hang_s or body.garbage or body.huge or body.rate_limit:
            rules.append(body)
        return {"faults": [r.model_dump() for r in rules]}

    @app.post("/admin/capacity")
    async def admin_capacity(request: Request, body: CapacityBody) -> dict[str, Any]:
        authorised(request)
        hit = state.set_capacity(body.count, body.offer_id, body.gpu, body.region)
        return {"offers": hit, "count": body.count}

    async def settle() -> float:
        if config.nodes:
            await nodes.reconcile()
        return state.now()

    async def preempt(instance_id: str) -> dict[str, Any]:
        inst = await asyncio.to_thread(state.preempt, mockio.int_id(instance_id))
        if config.nodes:
            await nodes.reconcile()
        with state.lock:
            return instance_json(state, inst, state.now(), listing=False)

    admin = mockserver.admin_router(
        clock=state.clock,
        settle=settle,
        billing=state.billing,
        instance_faults={"preempt": preempt},
        no_such_fault=lambda: StarletteHTTPException(404, "Not Found"),
    )
    app.include_router(admin, dependencies=[Depends(authorised)])
    return app


def _disk(value: Any) -> float:
    """GB of disk a search or launch asks for (the spec has checked it is a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e6:
        return DEFAULT_DISK_GB
    return float(value)


def _integer(raw: str) -> bool:
    return raw.removeprefix("-").isdecimal() and len(raw) <= 20


class MockCloud(mockserver.MockCloud[MockVastState]):
    """A mock Vast.ai served on loopback (in process: tests, demos)."""


def start_mock_cloud(config: MockVastConfig | None = None, port: int | None = None) -> MockCloud:
    """Serve a mock Vast.ai on 127.0.0.1 (a free port unless given) in a background thread."""
    from procure.local import free_port

    config = config or MockVastConfig()
    config.host_port = config.host_port or free_port()
    state = MockVastState(config)
    server = mockserver.start_app(create_app(state), port or free_port())
    return MockCloud(server.url, state, server)


def serve_mock_cloud(
    port: int = 4300,
    *,
    api_key: str | None = None,
    speed: float = 1.0,
    boot_s: float = 60.0,
    seed: int = 0,
    outbid_per_hour: float = 0.2,
    rate_scale: float = 1.0,
    node_token: str | None = None,
    host_port: int = 0,
    nodes: bool = True,
) -> None:
    """Serve the mock Vast.ai on 127.0.0.1:`port` until interrupted (`procure mock-cloud
    --provider vast`). The key: `api_key`, else VAST_API_KEY, else mock-vast-key."""
    import os

    from procure.local import free_port

    config = MockVastConfig(
        api_key=api_key or os.environ.get("VAST_API_KEY") or "mock-vast-key",
        speed=speed,
        boot_s=boot_s,
        seed=seed,
        outbid_per_hour=outbid_per_hour,
        rate_scale=rate_scale,
        node_token=node_token,
        host_port=host_port or free_port(),
        nodes=nodes,
    )
    mockserver.serve_foreground(create_app(MockVastState(config)), port)
