"""The local chain's journal: one JSON line per mined transaction, appended and fsynced before
anyone sees the transaction, read back (a torn last line dropped) to replay the chain on start.
See `procure.payments.chain` for the rules it keeps."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1


class JournalError(RuntimeError):
    """The journal cannot be read or written consistently."""


class JournalReplayError(JournalError):
    """Replaying the journal did not reproduce the recorded chain."""


def to_hex(value: bytes | str) -> str:
    """Return ``value`` as a lowercase 0x-prefixed hex string."""
    if isinstance(value, str):
        return value.lower() if value.startswith("0x") else "0x" + value.lower()
    return "0x" + bytes(value).hex()


def jsonable(value: Any) -> Any:
    """Convert contract-call arguments into JSON-friendly values (bytes become hex)."""
    if isinstance(value, bytes | bytearray):
        return to_hex(bytes(value))
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    return value


def read_journal(path: Path | None) -> list[dict[str, Any]]:
    """Parse the journal, dropping (and truncating away) a torn final line."""
    if path is None or not path.exists():
        return []
    blob = path.read_bytes()
    cut = blob.rfind(b"\n") + 1
    if cut < len(blob):
        # The last write never finished (no newline), so it was never acknowledged.
        with path.open("r+b") as fh:
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(blob[:cut].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise JournalError(f"{path}:{number}: corrupt journal line") from exc
    return entries


def append_journal(path: Path | None, entry: dict[str, Any]) -> None:
    """Append one line and fsync; on failure, truncate back and re-raise."""
    if path is None:
        return
    line = (json.dumps(entry, separators=(",", ":"), sort_keys=True) + "\n").encode()
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        start = fh.tell()
        try:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            fh.truncate(start)
            raise
    if created:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable (best effort on odd filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
