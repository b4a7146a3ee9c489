"""Dashboard sessions and CSRF: an HMAC-signed session cookie (never the raw token) issued after
the login form, and a per-session CSRF token that every mutating form carries. A cookie that is
malformed (or not ASCII) is no session, never an error. A logged-out session is revoked: in
memory for every read, and in the store (`Auth.keep_logouts_in`) so that neither a restart nor
another server over the same store accepts a copy of its cookie again. Failed logins are slowed
down per client address (procure.web.login_limit)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError

from procure.settings import Settings
from procure.store import Store, revoked_sessions
from procure.web.login_limit import LoginLimiter
from procure.web.settings import WebSettings

COOKIE = "procure_session"
MAX_REVOKED = 100_000  # logged-out sessions remembered until they would have expired anyway
REFRESH_S = 3.0  # how often a read looks for logouts made on other servers over the store

log = logging.getLogger(__name__)


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two strings from outside: compare_digest refuses non-ASCII
    str (a TypeError, which would be a 500), so both are compared as UTF-8 bytes."""
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


@dataclass(frozen=True)
class Session:
    sid: str
    issued: int
    authenticated: bool  # False: the anonymous session of an open (token-less) dashboard


class Revocations:
    """The logged-out sessions (sid -> when it would have expired). Reads only look in memory;
    with a store attached, logouts are written there too, every live one is loaded when the
    store is attached (a restart), and reads fetch the others' logouts on a thread now and then
    (never on the event loop)."""

    def __init__(self) -> None:
        self.memory: dict[str, float] = {}
        self.lock = threading.Lock()
        self.store: Store | None = None
        self.max_age_s = 0
        self.loaded_at = float("-inf")  # monotonic
        self.loading = False

    def __contains__(self, sid: str) -> bool:
        self._refresh_soon()
        return sid in self.memory

    def attach(self, store: Store, max_age_s: int) -> None:
        """Keep logouts in `store` from now on, and refuse those it holds already."""
        self.store, self.max_age_s = store, max_age_s
        self.loading = True
        self._load()

    def add(self, sid: str, issued: int, until: float, *, durable: bool) -> None:
        """Revoke `sid` until `until` (epoch seconds); `durable`: in the store as well. Blocks
        on the store: call it off the event loop."""
        self._remember({sid: until})
        if durable and self.store is not None:
            with self.store.session() as s:
                kept = revoked_sessions.revoke(
                    s, sid, datetime.fromtimestamp(issued, UTC), issued_after=self._oldest()
                )
            if not kept:  # only the token logs in: a full table is the operators' own doing
                log.warning("revoked_sessions is full: a logout is kept on this server only")

    def _oldest(self) -> datetime:
        """Sessions issued before this have expired: their revocations are of no more use."""
        return datetime.fromtimestamp(time.time() - self.max_age_s, UTC)

    def _remember(self, found: dict[str, float]) -> None:
        now = time.time()
        with self.lock:
            if len(self.memory) + len(found) > MAX_REVOKED:  # forget those expired by now
                for sid, until in list(self.memory.items()):
                    if until < now:
                        del self.memory[sid]
            for sid, until in found.items():
                if sid in self.memory or len(self.memory) < MAX_REVOKED:
                    self.memory[sid] = until

    def _refresh_soon(self) -> None:
        if self.store is None or time.monotonic() - self.loaded_at < REFRESH_S:
            return
        with self.lock:
            if self.loading:
                return
            self.loading = True
        threading.Thread(target=self._load, name="dashboard-logouts", daemon=True).start()

    def _load(self) -> None:
        """Every live revocation in the store, into memory (`loading` is set by the caller)."""
        store = self.store
        try:
            if store is None:
                return
            with store.session() as s:
                rows = revoked_sessions.revoked(s, issued_after=self._oldest())
            self._remember({sid: at.timestamp() + self.max_age_s for sid, at in rows.items()})
        except SQLAlchemyError as exc:  # the store is down: asked again at the next refresh
            log.warning("could not read the dashboard's logouts from the store: %s", exc)
        finally:
            self.loaded_at = time.monotonic()
            self.loading = False


@dataclass(frozen=True)
class Auth:
    """What the dashboard checks a request against, built once per app."""

    token: str | None
    public_read: bool
    max_age_s: int
    key: bytes
    revoked: Revocations = field(default_factory=Revocations, compare=False)
    logins: LoginLimiter = field(default_factory=LoginLimiter, compare=False)

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

    def keep_logouts_in(self, store: Store) -> None:
        """Logouts are written to `store` and those it holds are refused: they outlive a
        restart and count on every server over the store. Blocks on the store (once)."""
        self.revoked.attach(store, self.max_age_s)

    def revoke(self, session: Session) -> None:
        """Log a session out on the server: its cookie is refused from now on, even if kept.
        Only a logged-in session is written to the store: an anonymous one (anyone may get
        one) is signed with a key of this process alone, so a restart ends it anyway. Blocks
        on the store: call it off the event loop."""
        until = session.issued + self.max_age_s
        self.revoked.add(session.sid, session.issued, until, durable=session.authenticated)

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
