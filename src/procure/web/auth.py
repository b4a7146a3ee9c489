"""Dashboard sessions and CSRF: an HMAC-signed session cookie (never the raw token) issued after
the login form, and a per-session CSRF token that every mutating form carries."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from procure.settings import Settings
from procure.web.settings import WebSettings

COOKIE = "procure_session"


@dataclass(frozen=True)
class Session:
    sid: str
    issued: int
    authenticated: bool  # False: the anonymous session of an open (token-less) dashboard


@dataclass(frozen=True)
class Auth:
    """What the dashboard checks a request against, built once per app."""

    token: str | None
    public_read: bool
    max_age_s: int
    key: bytes

    @property
    def open(self) -> bool:
        """No token set: anyone on the network may read and act (local use)."""
        return self.token is None

    def sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()

    def new_session(self, *, authenticated: bool) -> tuple[Session, str]:
        """A fresh session and its cookie value `sid.issued.flag.signature`."""
        session = Session(secrets.token_hex(16), int(time.time()), authenticated)
        body = f"{session.sid}.{session.issued}.{int(authenticated)}"
        return session, f"{body}.{self.sign(body)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, if its signature is ours and it has not expired."""
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        sid, issued, flag, signature = parts
        if not hmac.compare_digest(self.sign(f"{sid}.{issued}.{flag}"), signature):
            return None
        if not issued.isdigit() or int(issued) + self.max_age_s < time.time():
            return None
        return Session(sid, int(issued), flag == "1")

    def check_token(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def csrf(self, session: Session) -> str:
        return self.sign(f"csrf.{session.sid}")

    def csrf_ok(self, session: Session | None, given: str | None) -> bool:
        return (
            session is not None
            and given is not None
            and hmac.compare_digest(self.csrf(session), given)
        )


def make_auth(settings: Settings, web: WebSettings) -> Auth:
    token = settings.api_token.get_secret_value() if settings.api_token else None
    # Sessions are signed with a key derived from the token: every server sharing the token
    # accepts them, and changing the token logs everyone out. Without a token the key is
    # per process (anonymous sessions only carry CSRF).
    key = (
        hmac.new(token.encode(), b"procure dashboard session v1", hashlib.sha256).digest()
        if token
        else secrets.token_bytes(32)
    )
    return Auth(token, web.public_read, int(web.session_hours * 3600), key)


def session_of(request: Request, auth: Auth) -> Session | None:
    return auth.read(request.cookies.get(COOKIE))


def bearer_ok(request: Request, auth: Auth) -> bool:
    header = request.headers.get("authorization", "")
    return auth.token is not None and hmac.compare_digest(
        header.encode(), f"Bearer {auth.token}".encode()
    )


def may_read(request: Request, auth: Auth) -> bool:
    """Reads are open without a token or with PROCURE_PUBLIC_READ; else a login or a bearer."""
    if auth.open or auth.public_read or bearer_ok(request, auth):
        return True
    session = session_of(request, auth)
    return session is not None and session.authenticated


def may_act(request: Request, auth: Auth) -> bool:
    """Mutations need a logged-in session when a token is set (CSRF is checked apart)."""
    if auth.open:
        return True
    session = session_of(request, auth)
    return session is not None and session.authenticated
