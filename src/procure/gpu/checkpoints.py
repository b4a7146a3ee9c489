"""The checkpoint store: URLs any node can read (a local directory by default; `s3://`, `gs://`,
... through fsspec and its package for that protocol), checked before a job is given one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import fsspec
from fsspec.core import split_protocol

MAX_URL_CHARS = 2_048
MAX_CHECKPOINT_BYTES = 64 << 20
"""What `read_bytes` reads at most: a checkpoint larger than this is not read whole."""
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\s]")


class CheckpointError(ValueError):
    """A checkpoint URL that cannot be used here (unknown protocol, missing package, bad text)."""


def check_url(url: str) -> str:
    """`url` when fsspec can open it on this node; `CheckpointError` saying why not."""
    if not url or len(url) > MAX_URL_CHARS:
        raise CheckpointError(f"a checkpoint URL has 1 to {MAX_URL_CHARS} characters")
    if _BAD_CHARS.search(url):
        raise CheckpointError("a checkpoint URL has no spaces or control characters")
    protocol = split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        # e.g. s3:// without s3fs: say which package, as fsspec does.
        raise CheckpointError(f"{protocol}:// needs a package on this node: {exc}") from None
    except ValueError:
        raise CheckpointError(f"unknown checkpoint protocol {protocol!r}") from None
    return url


def is_local(url: str) -> bool:
    return (split_protocol(url)[0] or "file") in ("file", "local")


def local_path(url: str) -> Path:
    """The directory a local (`file://` or plain path) URL names, `~` expanded."""
    path = split_protocol(url)[1] if url.startswith(("file://", "local://")) else url
    return Path(os.path.expanduser(path))


def local_dir(url: str) -> str:
    """The local directory `url` names as an absolute path (what docker can mount), created."""
    path = local_path(url).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def job_dir(root: str, job_id: str) -> str:
    """The folder under `root` where job `job_id` writes its checkpoints (created when local,
    as object stores have no folders)."""
    if is_local(root):
        return local_dir(str(local_path(root) / job_id))
    return f"{root.rstrip('/')}/{job_id}"


def write_bytes(url: str, data: bytes) -> None:
    """Write one checkpoint whole: to a temporary name first, then moved into place where the
    store can move (a reader never sees half a checkpoint on a local disk)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    if is_local(url):
        temporary = f"{path}.partial"
        with fs.open(temporary, "wb") as out:
            out.write(data)
        fs.mv(temporary, path)
    else:
        with fs.open(path, "wb") as out:  # object stores write whole objects on close
            out.write(data)


def read_bytes(url: str, max_bytes: int = MAX_CHECKPOINT_BYTES) -> bytes:
    """The checkpoint at `url`; `CheckpointError` when it is larger than `max_bytes`."""
    with fsspec.open(url, "rb") as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"checkpoint larger than {max_bytes:,} bytes: {url}")
    return bytes(data)


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return bool(fs.exists(path))
