"""Without PROCURE_API_TOKEN the API answers only requests addressed to loopback or an IP address:
a web page could otherwise point a host name of its own at 127.0.0.1 (DNS rebinding) and, being
same-origin with that name, read the open API and start runs that spend the wallet's money."""

from __future__ import annotations

import ipaddress
import json

from starlette.types import ASGIApp, Receive, Scope, Send


def addressed_directly(host_header: str) -> bool:
    """Whether a Host header names loopback (`localhost`, `*.localhost`, which browsers resolve
    to loopback themselves) or an IP address (which no one can rebind), with or without a port."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DirectHostsOnly:
    """ASGI middleware refusing (421) a request whose Host names anything else; a request with
    no Host at all (not a browser's) is served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = dict(scope.get("headers") or []).get(b"host")
            host = raw.decode("latin-1")[:300] if raw is not None else None
            if host is not None and not addressed_directly(host):
                await _refuse(send, host)
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send, host: str) -> None:
    message = (
        f"this server has no PROCURE_API_TOKEN, so it answers only to localhost and IP "
        f"addresses, not to the host name {host!r} (a web page could reach an open API through "
        "a name of its own pointed at this machine); set PROCURE_API_TOKEN to serve host names"
    )
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 421,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
