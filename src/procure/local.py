"""Running procure's own services on loopback: the facilitator and mock vendors, each in a
uvicorn server on a thread (for `procure demo` and the tests), on free ports.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from procure.bounds import UnsafeInput, loads
from procure.httpbounds import bounded_client, tls_context

# The facilitator's chain (web3, eth_tester), the mock vendor's x402 server and uvicorn are
# imported by the functions that start them: `free_port` and `asset_info` serve processes (the
# mock clouds, `vendors seed`) that run none of them.
if TYPE_CHECKING:
    from fastapi import FastAPI
    from x402.http import HTTPFacilitatorClient

    from procure.models import Vendor
    from procure.settings import Settings
    from procure.uvserver import Server
    from procure.vendors.mock import MockVendorConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    app: FastAPI
    port: int
    server: Server
    thread: threading.Thread
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: list[LocalServer]) -> None:
    """Stop every server, all at once (uvicorn's shutdown still gives connections 0.1 s)."""
    for s in servers:
        s.server.exit()
    for s in servers:
        s.thread.join(timeout=10)


def serve(app: FastAPI, port: int | None = None, host: str = "127.0.0.1") -> LocalServer:
    """Start `app` on `host` (loopback) in a daemon thread; return once it accepts
    connections."""
    from procure.uvserver import local_server

    port = port or free_port()
    server = local_server(app, host, port)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"server on {host}:{port} did not start")
        time.sleep(0.01)
    return LocalServer(app, port, server, thread, host)


def start_facilitator(journal: Path, port: int | None = None) -> LocalServer:
    from procure.payments.chain import LocalChain
    from procure.payments.facilitator import create_facilitator_app

    return serve(create_facilitator_app(LocalChain(journal)), port)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR as uvicorn sets it: a port
    whose last connections are still in TIME_WAIT (just freed) is free, not busy."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def asset_info(facilitator_url: str, tries: int = 50) -> dict[str, object]:
    """What the facilitator settles in: network, token address, EIP-712 name and version."""
    last: Exception | None = None
    for _ in range(tries):
        try:
            response = httpx.get(f"{facilitator_url}/asset", timeout=5, verify=tls_context())
            response.raise_for_status()
            return dict(loads(response.content))
        except (httpx.HTTPError, UnsafeInput, TypeError, ValueError) as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"facilitator at {facilitator_url} is not answering: {last}")


def mock_fail_rate(settings: Settings, vendor_id: str) -> float:
    """The share of `vendor_id`'s jobs that fail, as the seeds configure it: FAIL_VENDOR_ID's
    fail at FAIL_RATE (0: never; unset: always), every other vendor's never."""
    if settings.fail_vendor_id != vendor_id:
        return 0.0
    return 1.0 if settings.fail_rate is None else settings.fail_rate


def mock_vendor_config(
    vendor: Vendor, facilitator_url: str, secret: str, **overrides: object
) -> MockVendorConfig:
    from procure.vendors.mock import MockVendorConfig
    from procure.vendors.registry import vendor_payee

    info = asset_info(facilitator_url)
    fields: dict[str, object] = {
        "vendor_id": vendor.vendor_id,
        "name": vendor.name,
        "price_per_hour": vendor.base_price_per_hour,
        "secret": secret,
        "pay_to": vendor.pay_to or vendor_payee(vendor.vendor_id),
        "network": str(info["network"]),
        "asset": str(info["asset"]),
        "asset_extra": {"name": info["name"], "version": info["version"]},
        "gpu_types": list(vendor.supported_gpu_types),
    }
    fields.update(overrides)
    return MockVendorConfig(**fields)  # type: ignore[arg-type]


def facilitator_client(facilitator_url: str, timeout_s: float = 10.0) -> HTTPFacilitatorClient:
    """The x402 SDK's facilitator client, each of its calls bounded in time and size."""
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient

    http = bounded_client(deadline_s=timeout_s, follow_redirects=False)
    return HTTPFacilitatorClient(FacilitatorConfig(url=facilitator_url, http_client=http))


def start_mock_vendor(
    cfg: MockVendorConfig, facilitator_url: str, port: int | None = None
) -> LocalServer:
    from procure.vendors.mock import create_mock_vendor_app

    return serve(create_mock_vendor_app(cfg, facilitator_client(facilitator_url)), port)
