"""Delivering the outbox: Slack messages to the incoming webhook (honouring 429 Retry-After,
backing off on failure, never losing one) and audit entries to the log file and, optionally,
a local git repository (one commit per entry). Runs beside the controller, never inside it."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

import httpx

from procure.bounds import clip
from procure.models import utcnow
from procure.store import Store, fleet_repo

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 600.0
MAX_RETRY_AFTER_S = 3600.0


def backoff(attempts: int) -> float:
    return min(MAX_BACKOFF_S, 2.0 ** min(attempts, 12))


def retry_after(response: httpx.Response, attempts: int) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        return backoff(attempts)


async def deliver_slack(
    store: Store, client: httpx.AsyncClient, url: str, now: datetime | None = None
) -> int:
    """Post the due Slack messages in order; stop at the first refusal (Slack asks for about
    one message a second: the rest wait their turn). How many were delivered."""
    now = now or utcnow()
    with store.session() as s:
        due = [(m.id, m.payload, m.attempts) for m in fleet_repo.due_messages(s, "slack", now)]
    delivered = 0
    for message_id, payload, attempts in due:
        wait: float | None = None
        error = ""
        try:
            response = await client.post(url, json=payload)
            if response.status_code == 200:
                with store.session() as s:
                    fleet_repo.mark_delivered(s, message_id, utcnow())
                delivered += 1
                continue
            wait = (
                retry_after(response, attempts)
                if response.status_code == 429
                else backoff(attempts)
            )
            error = f"HTTP {response.status_code}: {clip(response.text, 100)}"
        except httpx.HTTPError as exc:
            wait, error = backoff(attempts), f"{type(exc).__name__}: {exc}"
        log.warning("Slack webhook refused a message (%s); retrying in %.0fs", error, wait)
        with store.session() as s:
            fleet_repo.mark_retry(s, message_id, utcnow() + timedelta(seconds=wait), error)
        break
    return delivered


def _git(directory: Path, *args: str) -> list[str]:
    return ["git", "-C", str(directory), *args]


async def _run(command: list[str]) -> int:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await process.wait()


async def ensure_git(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / ".git").exists():
        await _run(_git(directory, "init", "-q"))


async def write_audit(store: Store, path: Path, git_dir: Path | None) -> int:
    """Append the due audit entries to `path` (JSON lines) and, with `git_dir`, commit each to
    the repository there (`audit/actions.jsonl`). At least once: a crash between the write and
    the mark repeats an entry, never drops one (entries carry the action id and status)."""
    with store.session() as s:
        due = [(m.id, m.payload) for m in fleet_repo.due_messages(s, "audit", utcnow(), 100)]
    if not due:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for _, entry in due:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    if git_dir is not None:
        await ensure_git(git_dir)
        log_file = git_dir / "audit" / "actions.jsonl"
        log_file.parent.mkdir(exist_ok=True)
        for _, entry in due:
            with log_file.open("a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            action = entry.get("action", {})
            message = f"{action.get('status')}: {action.get('type')} {action.get('id')}"
            await _run(_git(git_dir, "add", "audit/actions.jsonl"))
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
                    clip(message, 200),
                )
            )
    with store.session() as s:
        for message_id, _ in due:
            fleet_repo.mark_delivered(s, message_id, utcnow())
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
