"""The tests' one shared TLS context (tests/shared_tls.py) is httpx's default, verifying one:
sharing it saves reading the CA bundle per client, and weakens no test that checks TLS."""

from __future__ import annotations

import ssl

import httpx


def _context(client: httpx.Client) -> ssl.SSLContext:
    return client._transport._pool._ssl_context  # type: ignore[attr-defined]


def test_default_clients_share_one_verifying_context() -> None:
    with httpx.Client() as a, httpx.Client() as b:
        shared = _context(a)
        assert _context(b) is shared
    asynchronous = httpx.AsyncClient()  # never opened: nothing to close
    assert asynchronous._transport._pool._ssl_context is shared  # type: ignore[attr-defined]
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname
    assert shared.cert_store_stats()["x509_ca"] > 0  # the CA bundle is loaded


def test_a_client_that_asks_for_no_verification_gets_its_own() -> None:
    with httpx.Client() as verifying, httpx.Client(verify=False) as insecure:
        assert _context(insecure) is not _context(verifying)
        assert _context(insecure).verify_mode == ssl.CERT_NONE
        assert _context(verifying).verify_mode == ssl.CERT_REQUIRED
