"""The mock Lambda Cloud's account firewall and machine images: `GET`/`PUT
/api/v1/firewall-rules` and `GET /api/v1/images` as Lambda's spec answers them. SkyPilot opens a
port by reading the account's inbound rules and putting back the whole list with its own added;
gpuhunt lists the images: without these a mock they cannot drive."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request, params
from fastapi.responses import Response

from procure.bounds import UnsafeInput, loads
from procure.clouds.lambda_cloud.catalogue import region_json
from procure.clouds.lambda_cloud.mockfaults import Faults, faulted, invalid
from procure.clouds.lambda_cloud.mockstate import MockCloudState
from procure.clouds.specs import SpecError, validate_request

RULES_PATH = "/api/v1/firewall-rules"
IMAGES_PATH = "/api/v1/images"
# What a new account allows in (Lambda's default rules are UNVERIFIED: SSH, as its docs show).
DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {
        "protocol": "tcp",
        "port_range": [22, 22],
        "source_network": "0.0.0.0/0",
        "description": "Allow SSH from anywhere",
    },
)
MAX_RULES = 1000


def images_json(state: MockCloudState) -> list[dict[str, Any]]:
    """One Lambda Stack image per region the mock has capacity in."""
    regions = sorted({r for by_region in state.config.capacity.values() for r in by_region})
    return [
        {
            "id": f"00000000-0000-4000-8000-{n:012d}",
            "created_time": "2026-01-15T00:00:00+00:00",
            "updated_time": "2026-01-15T00:00:00+00:00",
            "name": "lambda-stack-24-04",
            "description": "Lambda Stack 24.04",
            "family": "lambda-stack-24-04",
            "version": "24.04.1",
            "architecture": "x86_64",
            "region": region_json(region),
        }
        for n, region in enumerate(regions, 1)
    ]


def checked_rules(raw: Any) -> list[dict[str, Any]]:
    """A PUT body's rules, refused (Lambda's 400) unless the spec and its prose allow them: a
    port range for every protocol but icmp and none for icmp, low to high; an IPv4 network."""
    try:
        validate_request("lambda", "PUT", RULES_PATH, raw)
    except SpecError as exc:
        raise invalid(str(exc).removeprefix("lambda: ")) from None
    rules = raw["data"]
    if len(rules) > MAX_RULES:
        raise invalid(f"at most {MAX_RULES} firewall rules")
    for rule in rules:
        ports = rule.get("port_range")
        if (rule["protocol"] == "icmp") == (ports is not None):
            raise invalid("port_range is required, except for icmp, which takes none")
        if ports is not None and ports[0] > ports[1]:
            raise invalid("port_range is [min, max]")
        try:
            ipaddress.IPv4Network(rule["source_network"], strict=False)
        except ValueError:
            raise invalid("source_network is an IPv4 address or CIDR block") from None
    return [dict(r) for r in rules]


def net_router(
    state: MockCloudState, faults: Faults, dependencies: Sequence[params.Depends]
) -> APIRouter:
    router = APIRouter(dependencies=list(dependencies))
    state.firewall_rules = [dict(r) for r in DEFAULT_RULES]

    @router.get(RULES_PATH)
    async def list_rules() -> Response:
        async def answer() -> list[dict[str, Any]]:
            with state.lock:
                return [dict(r) for r in state.firewall_rules]

        return await faulted(faults, "firewall-rules", answer)

    @router.put(RULES_PATH)
    async def replace_rules(request: Request) -> Response:
        try:
            raw = loads(await request.body())
        except (UnsafeInput, ValueError):
            raise invalid("the body is not JSON") from None
        rules = checked_rules(raw)

        async def answer() -> list[dict[str, Any]]:
            with state.lock:
                state.firewall_rules = rules  # the whole list, as Lambda replaces it
                return [dict(r) for r in rules]

        return await faulted(faults, "firewall-rules", answer)

    @router.get(IMAGES_PATH)
    async def list_images() -> Response:
        async def answer() -> list[dict[str, Any]]:
            return images_json(state)

        return await faulted(faults, "images", answer)

    return router
