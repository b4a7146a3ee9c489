"""One constant-time check of an `Authorization: Bearer` header, for every service we run.
`secrets.compare_digest` raises on non-ASCII `str` (a header decodes as latin-1, so a client can
send any byte): compared as bytes, such a header is simply wrong, never a 500."""

from __future__ import annotations

import secrets


def bearer_matches(authorization: str | None, token: str) -> bool:
    # The scheme is case-insensitive (RFC 9110): "bearer x" is "Bearer x"; the token is not.
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""  # still compared, so a wrong scheme takes as long as a wrong token
    return (
        secrets.compare_digest(
            given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
        )
        and scheme.lower() == "bearer"
    )
