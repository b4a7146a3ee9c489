"""Secret files made once and kept (the wallet's key, the credentials' key, the gateway's node
key): written whole or not at all, so that no process, nor a crash, ever reads one empty."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def create_once(path: Path, content: bytes) -> bytes:
    """`path`'s content, writing `content` there first if it does not exist: to a private
    temporary file (mode 0600), synced, then linked into place. When another process links
    its own first (two processes starting on a new home), theirs stays and is returned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_bytes()
