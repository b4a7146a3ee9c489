"""What the GPU node keeps on disk so that a hard stop (SIGKILL, OOM, crash) leaves nothing behind:
a record of each running job (its process group, its container), ended at the next start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any

from procure.bounds import loads
from procure.gpu import checkpoints

log = logging.getLogger(__name__)

FALLBACK_DIR = "~/.cache/procure/gpu-node"
MAX_RECORD_BYTES = 65_536
DOCKER_RM_S = 30.0
JOB_ID = re.compile(r"job_[0-9a-f]{16}")
PID_MAX = 4 * 1024 * 1024  # Linux's PID_MAX_LIMIT: beyond it no process (os.killpg overflows)


def state_dir(checkpoint_root: str) -> Path:
    """Where the node keeps its state: beside its checkpoints when they are local (each node, and
    each test, has its own root), else in the user's cache."""
    if checkpoints.is_local(checkpoint_root):
        return checkpoints.local_path(checkpoint_root) / ".procure-node"
    return Path(os.path.expanduser(FALLBACK_DIR))


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None when
    there is no such process (or no /proc). With the pid, it names one process: pids recycle."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def me() -> dict[str, Any]:
    """This node process, as a record names its owner."""
    return {"pid": os.getpid(), "start": start_time(os.getpid()), "boot": _boot_id()}


def alive(owner: Any) -> bool:
    """Whether the node process a record names still runs (then the record is its own, not a
    leftover: two nodes may share a folder, as tests do)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("boot") != _boot_id():
        return False
    start = start_time(owner["pid"])
    return start is not None and start == owner.get("start")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` whole: a temporary file renamed into place, so a crash mid-write never leaves
    half a record for the next start to misread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Its own temporary name: several nodes in one process (the simulators) write at once.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """The record at `path`; None when absent or unreadable (a broken record is no record)."""
    try:
        # Non-blocking, and only a regular file: a named pipe in its place (the folder is in the
        # checkpoint root, which jobs write) blocked the node's start for good, awaiting a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                return None
            raw = stream.read(MAX_RECORD_BYTES + 1)
        # Bounded in depth too (the folder is in the checkpoint root, which jobs write): a deep
        # nest raised RecursionError here, which no caller expects, and the node never started.
        data = loads(raw, max_bytes=MAX_RECORD_BYTES) if len(raw) <= MAX_RECORD_BYTES else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def job_record(folder: Path, job_id: str) -> Path:
    return folder / "jobs" / f"{job_id}.json"


def record_job(folder: Path, job_id: str, pid: int | None, docker: str | None) -> None:
    """Note a job: its process group (led by `pid`; None before it is started, when only its id,
    in the environment of all it starts, can find its processes) and, run by `docker`, its
    container."""
    data = {
        "job": job_id,
        "pid": pid,
        "start": start_time(pid) if pid is not None else None,
        "node": me(),
        "docker": docker,
        "container": f"procure-{job_id}" if docker else None,
    }
    try:
        write_json(job_record(folder, job_id), data)
    except OSError as exc:  # the job runs regardless; only a crash of the node would leak it
        log.warning("job %s: cannot record it under %s: %s", job_id, folder, exc)


async def end_leftovers(folder: Path) -> int:
    """At start: end the jobs that a node which died without stopping them left running (their
    process groups, their containers); the number of records handled."""
    ended = 0
    removals: list[asyncio.Task[None]] = []
    for path in sorted((folder / "jobs").glob("*.json")):
        data = read_json(path)
        if data is not None and alive(data.get("node")):
            continue  # a node that still runs owns it
        if data is not None:
            ended += 1
            _kill_group(data)
            _kill_strays(data)
            docker, container = data.get("docker"), data.get("container")
            if isinstance(docker, str) and isinstance(container, str):
                # SIGKILL to the docker client leaves its container running: ask the daemon.
                removals.append(asyncio.create_task(_docker_rm(docker, container)))
        remove(path)
    if removals:
        await asyncio.gather(*removals)
    return ended


def _kill_group(data: dict[str, Any]) -> None:
    pid, start = data.get("pid"), data.get("start")
    node = data.get("node")
    if not isinstance(pid, int) or not 1 < pid <= PID_MAX or not isinstance(node, dict):
        return
    if start is None:
        return  # without the start time (no /proc) the pid cannot be told from a recycled one
    if node.get("boot") != _boot_id():
        return  # recorded before a reboot: that process group is long gone
    now = start_time(pid)
    # The leader still runs as recorded, or it died (as the node's death kills it) and its
    # children may hold the group: Linux hands out no pid still used as a group id, so the group
    # is still the job's. A live process with that pid but another start time is someone else.
    if now is not None and now != start:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        log.warning("ended job %s, left running by a node that died", data.get("job"))


def _kill_strays(data: dict[str, Any]) -> None:
    """What the job started in a session of its own (a daemon) is in no process group: found by
    the job's id in its environment (which no recycled pid carries)."""
    job = data.get("job")
    if not isinstance(job, str) or not JOB_ID.fullmatch(job):
        return
    for stray in job_processes(job, None):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(stray, signal.SIGKILL)
            log.warning("ended a process of job %s, left running by a node that died", job)


async def _docker_rm(docker: str, container: str) -> None:
    # ValueError: a NUL byte in a record's path or name (exec refuses it); no record may stop
    # the node from starting.
    with contextlib.suppress(OSError, ValueError):
        process = await asyncio.create_subprocess_exec(
            docker,
            "rm",
            "-f",
            container,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(process.wait(), DOCKER_RM_S)
        except TimeoutError:
            process.kill()
            await process.wait()


def job_processes(job_id: str, leader: int | None) -> set[int]:
    """The live processes of job `job_id` (Linux /proc), its leader excepted: the descendants of
    `leader`, and every process whose environment still carries `PROCURE_JOB_ID=<job_id>` (the
    runner sets it; children inherit it, and a daemon re-parented to init keeps it, whatever
    session or group it made for itself). Empty without /proc."""
    marker = f"\0PROCURE_JOB_ID={job_id}\0".encode()
    me = os.getpid()
    parents: dict[int, int] = {}
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in (me, leader):
                continue
            pid = int(entry.name)
            info = _stat(pid)
            if info is None or info[0] in ("Z", "X"):  # gone, or only its exit status left
                continue
            parents[pid] = info[1]
            if marker in b"\0" + _environ(pid):
                found.add(pid)
    if leader is not None:  # descendants that cleared their environment, by parentage
        tree = {leader}
        grew = True
        while grew:
            children = {p for p, parent in parents.items() if parent in tree} - tree
            tree |= children
            grew = bool(children)
        found |= tree - {leader}
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid (/proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


MAX_ENVIRON_BYTES = 1 << 20


def _environ(pid: int) -> bytes:
    """A process's environment as NUL-terminated entries; empty when it cannot be read (another
    user's process, one gone meanwhile)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read(MAX_ENVIRON_BYTES)
    except OSError:
        return b""
