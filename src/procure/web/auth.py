"""Dashboard sessions and CSRF: an HMAC-signed session cookie (never the raw token) issued after
the login form, and a per-session CSRF token that every mutating form carries. A cookie that is
malformed (or not ASCII) is no session, never an error; a logged-out session is revoked here."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from fastapi import Request

from procure.settings import Settings
from procure.web.settings import WebSettings

COOKIE = "procure_session"
MAX_REVOKED = 100_000  # logged-out sessions remembered until they would have expired anyway


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings from outside: compare_digest refuses non-ASCII
    str (a TypeError, which would be a 500), so both are compared as UTF-8 bytes."""
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


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
    revoked: dict[str, float] = field(default_factory=dict, compare=False)  # sid -> expiry
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

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
        if not cookie or len(cookie) > 200 or not cookie.isascii():
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        sid, issued, flag, signature = parts
        if not _same(self.sign(f"{sid}.{issued}.{flag}"), signature):
            return None
        if not issued.isdecimal() or len(issued) > 12 or int(issued) + self.max_age_s < time.time():
            return None
        if sid in self.revoked:
            return None
        return Session(sid, int(issued), flag == "1")

    def revoke(self, session: Session) -> None:
        """Log a session out on the server: its cookie is refused from now on, even if kept."""
        now = time.time()
        with self.lock:
            if len(self.revoked) >= MAX_REVOKED:  # forget those that have expired by now
                for sid, until in list(self.revoked.items()):
                    if until < now:
                        del self.revoked[sid]
            if len(self.revoked) < MAX_REVOKED:
                self.revoked[session.sid] = session.issued + self.max_age_s

    def check_token(self, given: str) -> bool:
        return self.token is not None and _same(given, self.token)

    def csrf(self, session: Session) -> str:
        return self.sign(f"csrf.{session.sid}")

    def csrf_ok(self, session: Session | None, given: str | None) -> bool:
        return session is not None and given is not None and _same(self.csrf(session), given)


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
    return auth.token is not None and _same(header, f"Bearer {auth.token}")


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
