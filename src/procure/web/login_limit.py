"""How fast one client may guess the dashboard's token: a few wrong tokens are free, then each
further one locks that client's address out for a window that doubles (up to MAX_LOCK_S). While
locked, the login form answers 429 with Retry-After and checks no token; a right token after
the window logs in as ever. Other addresses are never locked by it (an IPv6 client counts by
its /64, which one host usually holds whole). Memory is bounded: at most MAX_CLIENTS
addresses, the one seen least recently forgotten first."""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FREE_FAILURES = 5
FIRST_LOCK_S = 2.0
MAX_LOCK_S = 900.0
FORGET_S = 3600.0  # an address's failures count until this long after its last one
MAX_CLIENTS = 10_000


@dataclass
class _Tries:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


def client_key(address: str | None) -> str:
    """Whom the attempts are counted against: the address, or its /64 for IPv6."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # not an IP (a test client's name, a unix socket): as given, bounded
        return address[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # an IPv4 client on a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginLimiter:
    """Failed logins per client address; `clock`: monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.clients: OrderedDict[str, _Tries] = OrderedDict()
        self.lock = threading.Lock()

    def wait_s(self, address: str | None) -> float:
        """Seconds before this address may try a token again (0: now)."""
        with self.lock:
            tries = self.clients.get(client_key(address))
            return 0.0 if tries is None else max(0.0, tries.locked_until - self.clock())

    def failed(self, address: str | None) -> None:
        """A wrong token from `address`: past FREE_FAILURES, it locks the address out."""
        key, now = client_key(address), self.clock()
        with self.lock:
            tries = self.clients.pop(key, None) or _Tries()
            if now - tries.last > FORGET_S and now >= tries.locked_until:
                tries = _Tries()  # a guess an hour ago is no reason to wait now
            tries.failures += 1
            tries.last = now
            over = tries.failures - FREE_FAILURES
            if over >= 0:
                lock_s = MAX_LOCK_S if over > 20 else min(MAX_LOCK_S, FIRST_LOCK_S * 2**over)
                tries.locked_until = now + lock_s
            self.clients[key] = tries  # the newest at the end
            while len(self.clients) > MAX_CLIENTS:
                self.clients.popitem(last=False)

    def succeeded(self, address: str | None) -> None:
        """The right token: this address starts afresh."""
        with self.lock:
            self.clients.pop(client_key(address), None)


def retry_after(wait_s: float) -> str:
    """The Retry-After header for a wait: whole seconds, rounded up (never 0 while locked)."""
    return str(max(1, math.ceil(wait_s)))
