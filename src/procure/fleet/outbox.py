"""Delivering the outbox: Slack messages to the incoming webhook (honouring 429 Retry-After,
backing off on 5xx, recording and dropping what Slack refuses for good) and audit entries to the
log file and, optionally, a local git repository (one commit per entry). Runs beside the
controller, never inside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import update

from procure.bounds import clip
from procure.models import utcnow
from procure.store import Store, fleet_repo
from procure.store.fleet_tables import OutboxRow

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 600.0
MAX_RETRY_AFTER_S = 3600.0
# Slack's answers that no retry can change (invalid_payload, invalid_token, channel_not_found,
# no_service, channel_is_archived, ...): a few tries, then the message is recorded and dropped.
PERMANENT = frozenset({400, 403, 404, 410})
MAX_PERMANENT_TRIES = 3
# 5xx is retried (with Retry-After when given) but not for ever: a message the webhook always
# fails on must not hold the queue behind it for good (at the backoff cap, about 7 hours).
MAX_SERVER_ERROR_TRIES = 50
GIT_S = 10.0  # one git command of the audit's mirror, at most
CLAIM_S = 300.0  # longer than any delivery (the webhook's client has a deadline of seconds)


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF_S, 2.0 ** min(attempts, 12))


def retry_after(response: httpx.Response, attempts: int) -> float:
    """Retry-After in seconds or as an HTTP date (capped); the backoff when absent or garbage."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            return backoff(attempts)
    if not math.isfinite(seconds):
        return backoff(attempts)
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def claim(store: Store, message_id: int, now: datetime) -> bool:
    """Take the message for this pass, so that two controllers on one store (a standby
    beside the active one) never both send it; one that dies holding it frees it at CLAIM_S."""
    with store.session() as s:
        return fleet_repo.claim_message(s, message_id, now, utcnow() + timedelta(seconds=CLAIM_S))


def drop(store: Store, message_id: int, error: str) -> None:
    """Recorded (its last error says why) and no longer queued."""
    with store.session() as s:
        s.execute(
            update(OutboxRow)
            .where(OutboxRow.id == message_id)
            .values(
                delivered_at=utcnow(),
                attempts=OutboxRow.attempts + 1,
                last_error=clip(f"dropped: {error}", 300),
            )
            .execution_options(synchronize_session=False)
        )


async def deliver_slack(
    store: Store, client: httpx.AsyncClient, url: str, now: datetime | None = None
) -> int:
    """Post the due Slack messages in order (`deliver`; Slack answers 200 to a message it
    took). How many were delivered."""
    return await deliver(store, client, url, "slack", now=now, taken=lambda r: r.status_code == 200)


async def deliver(
    store: Store,
    client: httpx.AsyncClient,
    url: str,
    channel: str,
    *,
    now: datetime | None = None,
    taken: Callable[[httpx.Response], bool] = lambda r: r.is_success,
) -> int:
    """Post the due messages of `channel` to `url` in order. 429 and 5xx (and no answer)
    concern the webhook as a whole: the message waits (Retry-After, else backoff) and so do the
    ones behind it, keeping their order, but a 5xx only MAX_SERVER_ERROR_TRIES times in a row.
    Any other refusal concerns this message: it is tried again on the next pass without holding
    the others back, and dropped (recorded) after MAX_PERMANENT_TRIES in a row. How many were
    delivered."""
    now = now or utcnow()
    with store.session() as s:
        due = [
            (m.id, m.payload, m.attempts, m.last_error)
            for m in fleet_repo.due_messages(s, channel, now)
        ]
    delivered = 0
    for message_id, payload, attempts, last_error in due:
        if not claim(store, message_id, now):
            break  # another process's deliverer is sending it: the rest wait behind it
        try:
            response = await client.post(url, json=payload)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {clip(str(exc), 100)}"
            status = None
        else:
            status = response.status_code
            if taken(response):
                with store.session() as s:
                    fleet_repo.mark_delivered(s, message_id, utcnow())
                delivered += 1
                continue
            # Decoded here: `response.text` raises for a charset the body does not follow
            # (utf-16 without a BOM), and this message would never be counted or dropped.
            said = response.content[:400].decode("utf-8", "replace")
            error = f"HTTP {status}: {clip(said, 100)}"
        # The counts are of failures of one kind in a row: one 502 after hours of no answer
        # (a receiver starting behind its proxy) is its first 5xx, not its fiftieth.
        restart = _kind(error) != _kind(last_error)
        tries = 1 if restart else attempts + 1
        if status is not None and status != 429 and status < 500:  # this message's refusal
            if tries >= MAX_PERMANENT_TRIES:
                log.error("the %s webhook refused a message for good (%s)", channel, error)
                drop(store, message_id, error)
            else:
                log.warning("the %s webhook refused a message (%s)", channel, error)
                with store.session() as s:  # due again at once: it holds nothing back
                    fleet_repo.mark_retry(s, message_id, utcnow(), error, restart=restart)
            continue
        if status is not None and status >= 500 and tries >= MAX_SERVER_ERROR_TRIES:
            log.error("the %s webhook failed on a message for good (%s)", channel, error)
            drop(store, message_id, error)
            continue
        wait = retry_after(response, tries - 1) if status is not None else backoff(tries - 1)
        log.warning("the %s webhook failed (%s); retrying in %.0fs", channel, error, wait)
        with store.session() as s:
            at = utcnow() + timedelta(seconds=wait)
            fleet_repo.mark_retry(s, message_id, at, error, restart=restart)
        break
    return delivered


def _kind(error: str | None) -> str:
    """A failure's kind: the webhook's 5xx, its 429, a refusal of the message, or no answer."""
    if error is None or not error.startswith("HTTP "):
        return "no answer"
    code = error[5:8]
    return "5xx" if code.startswith("5") else "429" if code == "429" else "refused"


def _git(directory: Path, *args: str) -> list[str]:
    return ["git", "-C", str(directory), *args]


async def _run(command: list[str]) -> int:
    """Git's exit status; a git that hangs (a hook, a passphrase prompt) is killed, with what it
    started, after GIT_S: the mirror is best effort, the Slack messages behind it are not."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own group: the hook's children go with it
    )
    try:
        async with asyncio.timeout(GIT_S):
            return await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        return -int(signal.SIGKILL)


async def ensure_git(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / ".git").exists():
        await _run(_git(directory, "init", "-q"))


def _subject(entry: dict[str, Any]) -> str:
    """A commit's subject: the action's status, type and id, or the warning's budget."""
    if isinstance(entry.get("warning"), dict):
        w = entry["warning"]
        return f"warning: {w.get('scope')} {w.get('budget')} {w.get('period')}"
    action = entry.get("action") or {}
    return f"{action.get('status')}: {action.get('type')} {action.get('id')}"


async def _commit(git_dir: Path, due: list[tuple[int, dict[str, Any]]]) -> None:
    """Each entry committed to the repository at `git_dir`: a mirror of the JSON-lines log,
    kept best effort (a broken repository or a missing git is logged, never retried: the log
    file, written first, is the trail)."""
    try:
        await ensure_git(git_dir)
        log_file = git_dir / "audit" / "actions.jsonl"
        log_file.parent.mkdir(exist_ok=True)
        for _, entry in due:
            with log_file.open("a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            codes = [
                await _run(_git(git_dir, "add", "audit/actions.jsonl")),
                await _run(
                    _git(
                        git_dir,
                        "-c",
                        "user.name=procure fleet",
                        "-c",
                        "user.email=fleet@procure.invalid",
                        "commit",
                        "-q",
                        "-m",
                        clip(_subject(entry), 200),
                    )
                ),
            ]
            if any(codes):  # the rest would fail (or hang) the same way: the mirror misses them
                log.warning("the audit repository %s: git exited %s", git_dir, codes)
                return
    except OSError as exc:
        log.warning("the audit repository %s cannot be written: %s", git_dir, exc)


async def write_audit(store: Store, path: Path, git_dir: Path | None) -> int:
    """Append the due audit entries to `path` (JSON lines) and, with `git_dir`, commit each to
    the repository there (`audit/actions.jsonl`, best effort). At least once: a crash between
    the write and the mark repeats an entry, never drops one (entries carry the action id and
    status); a broken repository never repeats them."""
    now = utcnow()
    with store.session() as s:
        queued = [(m.id, m.payload) for m in fleet_repo.due_messages(s, "audit", now, 100)]
    due = []
    for message_id, entry in queued:  # in order, up to one another writer has taken
        if not claim(store, message_id, now):
            break
        due.append((message_id, entry))
    if not due:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for _, entry in due:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    with store.session() as s:
        for message_id, _ in due:
            fleet_repo.mark_delivered(s, message_id, utcnow())
    if git_dir is not None:
        await _commit(git_dir, due)
    return len(due)


async def run_outbox(
    store: Store,
    client: httpx.AsyncClient | None,
    webhook: str | None,
    audit_log: Path,
    audit_git: Path | None,
    every_s: float = 1.0,
) -> None:
    """Forever: deliver what is due. Errors are logged; the loop carries on."""
    while True:
        try:
            await write_audit(store, audit_log, audit_git)
            if client is not None and webhook:
                await deliver_slack(store, client, webhook)
            with store.session() as s:
                fleet_repo.prune_outbox(s, utcnow() - timedelta(days=7))
        except Exception:
            log.exception("delivering the fleet outbox failed; retrying")
        await asyncio.sleep(every_s)
