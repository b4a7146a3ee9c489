"""Text from outside (cloud instance names and types, vendor names, job logs, error messages)
made safe to print: terminal escape sequences, control and bidi characters removed, Rich markup
escaped; and secrets (URL passwords, webhook paths, bearer tokens, and every credential this
process has sent) redacted from log lines and from outside text before it is stored or shown."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit

from rich.markup import escape

from procure.bounds import clip

# ESC sequences (CSI, OSC ... up to BEL or ST, and two-character ones), 8-bit CSI/OSC, then
# any remaining C0/C1 control character, and the bidi controls that reorder what is shown.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC (hyperlinks, titles), to BEL or ST
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC
    r"|\x1b[@-Z\\-_]?"  # two-character sequences, or a lone ESC
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
    r"|\x9d[^\x07\x9c]*[\x07\x9c]?"  # 8-bit OSC
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_LINE_BREAKS = re.compile(r"[\t\n\r\u2028\u2029]+")


def clean(text: object, limit: int = 2000, *, one_line: bool = True) -> str:
    """`text` without escape sequences or control characters (and on one line unless asked
    otherwise), at most `limit` characters: safe for a terminal, not yet for Rich markup."""
    value = text if isinstance(text, str) else str(text)
    value = _ESCAPES.sub("", value[: limit * 4])
    if one_line:
        value = _LINE_BREAKS.sub(" ", value)
    value = _CONTROLS.sub("", value)
    return value if len(value) <= limit else value[: limit - 1] + "…"


# A "[" that Rich would not take for a tag: Rich still turns a "\\[" before it into "[", so it
# gets a backslash of its own (rich.markup.escape only escapes tag-like brackets).
_PLAIN_BRACKET = re.compile(r"\[(?![a-z#/@][^[]*?\])")


def safe(text: object, limit: int = 2000, *, one_line: bool = True) -> str:
    """`clean`, then Rich markup escaped: for `console.print` and Rich tables. Rich shows the
    result exactly as the text was (a trailing backslash is doubled, as rich.markup.escape
    does, so that it cannot escape a tag written after it)."""
    return _PLAIN_BRACKET.sub(r"\\[", escape(clean(text, limit, one_line=one_line)))


# --- secrets in text ---------------------------------------------------------------------------

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]*:[^/\s@]*@")
_SLACK_HOOK = re.compile(r"(?i)(hooks\.slack(?:-gov)?\.com/(?:services|workflows|triggers)/)\S+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{6,}")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:token|key|api_key|apikey|secret|password|signature|sig|auth)=)[^&\s\"']+"
)
REDACTED = "***"


# Every secret this process sends somewhere (a vendor's credential, a cloud's API key, a node's
# token): a vendor, cloud or node that echoes our request back in its error text or logs (a
# hostile one, or a buggy proxy) must not have it stored, logged or shown. Bounded (each is
# looked for in every text scrubbed): the least recently sent are forgotten first, as a
# long-lived worker meets new node tokens all the time.
MIN_SECRET_CHARS = 8  # shorter values would replace ordinary words
MAX_KNOWN_SECRETS = 1024
_known: dict[str, None] = {}  # in the order they were last sent
_known_lock = threading.Lock()
_known_sorted: tuple[str, ...] = ()


def remember_secret(*values: str | None) -> None:
    """Note `values` as secrets this process holds (call it each time one is sent): `scrub`
    and `redact` replace them from now on, wherever they appear. Values shorter than
    MIN_SECRET_CHARS are ignored."""
    global _known_sorted
    kept = [v for v in values if v and len(v) >= MIN_SECRET_CHARS]
    if not kept:
        return
    with _known_lock:
        fresh = any(value not in _known for value in kept)
        for value in kept:
            _known.pop(value, None)
            _known[value] = None  # the most recently sent: the last to be forgotten
        if not fresh:
            return
        while len(_known) > MAX_KNOWN_SECRETS:
            del _known[next(iter(_known))]
        # Longest first: a secret that holds another is replaced whole, not leaving its rest.
        _known_sorted = tuple(sorted(_known, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every remembered secret, each of `secrets` (however short: the caller knows
    it was sent), and URL passwords replaced by ***: exact, so fit for text that is otherwise
    kept as it is (a job's log lines)."""
    extra = [s for s in secrets if s]
    for secret in (*sorted(extra, key=len, reverse=True), *_known_sorted):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _USERINFO.sub(rf"\1{REDACTED}@", text)


def outside(text: object, limit: int, secrets: Iterable[str | None] = ()) -> str:
    """Text from outside (a vendor's or cloud's error, a job's error) made part of our message:
    `redact`ed, then clipped to `limit` (in that order: a secret cut in two would leave a part
    of itself)."""
    return clip(redact(text if isinstance(text, str) else str(text), secrets), limit)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with remembered secrets (and `secrets`), URL passwords, Slack webhook paths,
    bearer tokens and secret-looking query parameters replaced by ***."""
    text = scrub(text, secrets)
    text = _SLACK_HOOK.sub(rf"\1{REDACTED}", text)
    text = _BEARER.sub(rf"\1\2{REDACTED}", text)
    return _SECRET_QUERY.sub(rf"\1{REDACTED}", text)


def show_url(url: str) -> str:
    """A URL as it may be printed or logged: no password, and no path or query when the host is
    a webhook service (there the path is the secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a malformed URL)"
    if not parts.scheme or not host:
        return redact(clean(url, 200))
    if ":" in host:
        host = f"[{host}]"  # IPv6
    if "@" in parts.netloc:
        host = f"{REDACTED}@{host}"
    return redact(clean(f"{parts.scheme}://{host}{port}{parts.path}", 300))


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with `redact` (and without escape sequences), so a
    secret that reaches a log call (the HTTP library's request lines, an error that quotes a
    URL) is not written out. Installed on the handlers, so it sees every logger's records."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken log call: leave it to the handler to report
            return True
        cleaned = redact(clean(message, 20_000, one_line=False))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def guard_logging(level: int | str = logging.INFO) -> None:
    """After `logging.basicConfig`: redact secrets on every root handler, and keep the HTTP
    libraries' per-request INFO lines (full URLs, webhook paths included) out of the logs."""
    # alembic: its INFO lines (one per migration at each start) say nothing to a user
    for name in ("httpx", "httpcore", "hpack", "alembic"):
        logging.getLogger(name).setLevel(max(logging.WARNING, _level(level)))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def _level(level: int | str) -> int:
    value = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    return value if isinstance(value, int) else logging.INFO
