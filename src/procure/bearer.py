"""One constant-time check of an `Authorization: Bearer` header, for every service we run.
`secrets.compare_digest` raises on non-ASCII `str` (a header decodes as latin-1, so a client can
send any byte): compared as bytes, such a header is simply wrong, never a 500."""

from __future__ import annotations

import secrets


def bearer_matches(authorization: str | None, token: str) -> bool:
    given = (authorization or "").encode("utf-8", "surrogateescape")
    return secrets.compare_digest(given, f"Bearer {token}".encode("utf-8", "surrogateescape"))
