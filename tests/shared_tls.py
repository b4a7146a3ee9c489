"""One verifying TLS context per test process for every httpx client that asks for the default
one: `httpx.get(...)` and `httpx.Client()` otherwise each read the whole CA bundle (about 25 ms
of CPU), and the tests open thousands of them, nearly all to http:// on loopback."""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

import httpx._transports.default as transports

_make = transports.create_ssl_context


@functools.cache
def _default(trust_env: bool, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    del cert_file, cert_dir  # part of the key: httpx reads them from the environment
    return _make(verify=True, cert=None, trust_env=trust_env)


def _shared(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
    """httpx's own context for anything but the default (verify=False, a context, a client
    certificate); the default, built once for each CA setting in the environment."""
    if verify is not True or cert is not None:
        return _make(verify=verify, cert=cert, trust_env=trust_env)
    env = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")) if trust_env else ()
    return _default(trust_env, *(env or (None, None)))


def share_default_tls_context() -> None:
    """Makes httpx's transports build the default verifying context once per process. Shared
    as the agent's own clients share theirs (`procure.httpbounds.tls_context`): nothing loads
    a client certificate into it."""
    transports.create_ssl_context = _shared  # type: ignore[assignment]
