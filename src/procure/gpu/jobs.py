"""The node's job runner: a user's job as a real process (or `docker run --rm`), its status,
progress and last checkpoint read from the lines it prints, a bounded log ring, and cancel."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from procure.bounds import clip
from procure.gpu import checkpoints, nodestate

log = logging.getLogger(__name__)

PROGRESS = "PROCURE_PROGRESS"
CHECKPOINT = "PROCURE_CHECKPOINT"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
RESERVED_ENV = frozenset({"PROCURE_JOB_ID", "PROCURE_CHECKPOINT_DIR", "PROCURE_RESUME_FROM"})
# The node's own environment holds its token and the orchestrator's secret: a job sees only these.
PASSED_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "LD_LIBRARY_PATH",
)
READ_CHUNK = 65_536
DRAIN_S = 2.0  # after the process exits, how long its children may keep the pipe open
NO_LINES: deque[tuple[int, str]] = deque(maxlen=0)  # a forgotten job's: shared, holds nothing


class JobRefused(Exception):
    """A submission the node will not run; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_running: int = 1
    keep: int = 50
    # Idempotency keys of jobs `keep` pushed out, each with its job's final state: a retried
    # submission is answered with it, never run again (paid once, run twice). Oldest use first.
    keep_keys: int = 10_000
    log_lines: int = 2_000
    line_bytes: int = 4_096
    cancel_grace_s: float = 10.0
    checkpoint_root: str = "~/.cache/procure/checkpoints"
    docker: str = "docker"
    docker_gpus: str | None = "all"
    state_dir: Path | None = None  # where running jobs are recorded (None: not recorded)


@dataclass
class Job:
    id: str
    argv: list[str]
    env: dict[str, str]
    checkpoint_dir: str
    resume_from: str | None
    image: str | None
    key: str | None
    fingerprint: str
    log_lines: int
    status: str = "queued"
    progress: float = 0.0
    checkpoint: str | None = None
    exit_code: int | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    cancel_requested: bool = False
    lines: deque[tuple[int, str]] = field(default_factory=deque)
    last_seq: int = 0
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "progress": round(self.progress, 6),
            "checkpoint": self.checkpoint,
            "checkpointDir": self.checkpoint_dir,
            "resumeFrom": self.resume_from,
            "image": self.image,
            "idempotencyKey": self.key,
            "exitCode": self.exit_code,
            "error": self.error,
            "createdAt": self.created_at,
            "startedAt": self.started_at,
            "endedAt": self.ended_at,
            "logLines": self.last_seq,
        }

    def add_line(self, text: str) -> None:
        self.last_seq += 1
        self.lines.append((self.last_seq, text))
        while len(self.lines) > self.log_lines:
            self.lines.popleft()
        _read_protocol(self, text)

    def page(self, after: int, limit: int, max_bytes: int) -> dict[str, Any]:
        """Lines with seq > `after`, at most `limit` of them and about `max_bytes` of text."""
        out: list[dict[str, Any]] = []
        size = 0
        first = self.lines[0][0] if self.lines else self.last_seq + 1
        for seq, text in self.lines:
            if seq <= after:
                continue
            if len(out) >= limit or (out and size + len(text) > max_bytes):
                break
            out.append({"seq": seq, "text": text})
            size += len(text) + 32
        following = out[-1]["seq"] if out else max(after, first - 1)
        return {
            "lines": out,
            "next": following,
            "dropped": max(0, first - 1 - after),  # lines the ring forgot before this page
            "done": self.status in TERMINAL and following >= self.last_seq,
        }


def _read_protocol(job: Job, text: str) -> None:
    word, _, rest = text.strip().partition(" ")
    value = rest.strip()
    if word == PROGRESS:
        try:
            progress = float(value)
        except ValueError:
            return
        if math.isfinite(progress):
            job.progress = min(1.0, max(0.0, progress))
    elif word == CHECKPOINT and value and " " not in value:
        with contextlib.suppress(checkpoints.CheckpointError):
            job.checkpoint = checkpoints.check_url(value)


def fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class JobRunner:
    """The jobs of one node, in memory: a node that restarts has forgotten them (its client
    sees 404 and resumes from the last checkpoint elsewhere)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.jobs: dict[str, Job] = {}
        self.by_key: dict[str, Job] = {}
        self.ended_keys: OrderedDict[str, Job] = OrderedDict()  # key -> forgotten job, ended
        self.slots = asyncio.Semaphore(limits.max_running)
        self.closing = False

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def submit(
        self,
        *,
        command: list[str],
        image: str | None,
        env: dict[str, str],
        resume_from: str | None,
        checkpoint_dir: str | None,
        key: str | None,
    ) -> tuple[Job, bool]:
        """The job (new, or the one already submitted under `key`) and whether it is new.
        Synchronous up to the task it starts, so two retries of one key never both start."""
        spec = {
            "command": command,
            "image": image,
            "env": env,
            "resumeFrom": resume_from,
            "checkpointDir": checkpoint_dir,
        }
        digest = fingerprint(spec)
        known = self._known(key)
        if known is not None:
            if known.fingerprint != digest:
                raise JobRefused(409, "idempotencyKey already used for a different job")
            return known, False
        if self.closing:
            raise JobRefused(503, "the node is stopping")
        if reserved := sorted(RESERVED_ENV & env.keys()):
            raise JobRefused(422, f"env may not set {', '.join(reserved)}: the runner sets them")
        try:
            if resume_from is not None:
                checkpoints.check_url(resume_from)
            root = checkpoints.check_url(checkpoint_dir or self.limits.checkpoint_root)
        except checkpoints.CheckpointError as exc:
            raise JobRefused(422, str(exc)) from None
        docker = None
        if image is not None:
            docker = shutil.which(self.limits.docker)
            if docker is None:
                raise JobRefused(
                    422,
                    f"this job needs a container image run, but {self.limits.docker!r} is not "
                    "on this node's PATH: install Docker, or submit a command without an image",
                )
        self._make_room()
        job_id = "job_" + secrets.token_hex(8)
        try:
            if checkpoint_dir is None:
                folder = checkpoints.job_dir(root, job_id)
            elif checkpoints.is_local(root):
                # docker mounts only an absolute path (`file://x` or `~/x` would fail the run),
                # and the job must see the folder by the name that is mounted.
                folder = checkpoints.local_dir(root)
            else:
                folder = root
        except (RuntimeError, OSError) as exc:
            # A loop of symlinks: RuntimeError from Path.resolve on 3.11, ELOOP from 3.13 on.
            if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
                raise JobRefused(422, "the checkpoint folder is a loop of symbolic links") from None
            raise JobRefused(500, f"cannot create the checkpoint folder: {exc}") from None
        job_env = dict(env)
        job_env["PROCURE_JOB_ID"] = job_id
        job_env["PROCURE_CHECKPOINT_DIR"] = folder
        if resume_from is not None:
            job_env["PROCURE_RESUME_FROM"] = resume_from
        argv = list(command)
        if docker is not None and image is not None:
            argv = _docker_argv(docker, job_id, image, command, job_env, folder)
            if self.limits.docker_gpus:
                argv[2:2] = ["--gpus", self.limits.docker_gpus]
        job = Job(
            id=job_id,
            argv=argv,
            env=job_env,
            checkpoint_dir=folder,
            resume_from=resume_from,
            image=image,
            key=key,
            fingerprint=digest,
            log_lines=self.limits.log_lines,
            # Until it writes its own, the point to resume from is still the one it started at.
            checkpoint=resume_from,
        )
        self.jobs[job_id] = job
        if key is not None:
            self.by_key[key] = job
        job.task = asyncio.create_task(self._run(job), name=f"gpu-job-{job_id}")
        return job, True

    def _make_room(self) -> None:
        if len(self.jobs) < self.limits.keep:
            return
        finished = sorted(
            (j for j in self.jobs.values() if j.status in TERMINAL),
            key=lambda j: j.ended_at or 0.0,
        )
        if not finished:
            raise JobRefused(
                429, f"this node already holds {len(self.jobs)} unfinished jobs: try again later"
            )
        for old in finished[: len(self.jobs) - self.limits.keep + 1]:
            del self.jobs[old.id]
            if old.key is not None and self.by_key.get(old.key) is old:
                del self.by_key[old.key]
                self._remember(old.key, old)

    def _known(self, key: str | None) -> Job | None:
        """The job submitted under `key`: held, or forgotten since and ended (its final state)."""
        if key is None:
            return None
        if key in self.by_key:
            return self.by_key[key]
        ended = self.ended_keys.get(key)
        if ended is not None:
            self.ended_keys.move_to_end(key)  # asked again: kept the longest
        return ended

    def _remember(self, key: str, job: Job) -> None:
        """Keep `job`'s final state under its key, without what a retry is not answered with
        (its command, env and log lines): bounded by `keep_keys`, the least asked for first."""
        slim = replace(job, argv=[], env={}, lines=NO_LINES, process=None, task=None)
        self.ended_keys[key] = slim
        self.ended_keys.move_to_end(key)
        while len(self.ended_keys) > self.limits.keep_keys:
            self.ended_keys.popitem(last=False)

    async def _run(self, job: Job) -> None:
        try:
            async with self.slots:
                if job.cancel_requested:
                    self._finish(job, "cancelled", None, "cancelled before it started")
                    return
                await self._execute(job)
        except Exception as exc:  # a runner bug must still end the job, never leave it running
            log.exception("job %s: the runner failed", job.id)
            self._finish(job, "failed", job.exit_code, f"the runner failed: {exc}")
        finally:
            if job.status not in TERMINAL:
                self._finish(job, "cancelled", job.exit_code, "the node stopped")

    async def _execute(self, job: Job) -> None:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ} | job.env
        tie = functools.partial(_die_with_node, os.getpid()) if _DIE_WITH_NODE else None
        _hide_node_environment()
        docker = job.argv[0] if job.image is not None else None
        if self.limits.state_dir is not None:
            # Recorded before it starts: the node may die before the spawn returns (the job, run at
            # once, may already have started a daemon); its next start ends the job by its id.
            nodestate.record_job(self.limits.state_dir, job.id, None, docker)
        try:
            process = await asyncio.create_subprocess_exec(
                *job.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: cancel reaches its children
                preexec_fn=tie,  # it dies with the node
            )
        except OSError as exc:
            if self.limits.state_dir is not None:
                nodestate.remove(nodestate.job_record(self.limits.state_dir, job.id))
            self._finish(job, "failed", None, f"could not start {job.argv[0]!r}: {exc}")
            return
        job.process = process
        job.started_at = time.time()
        if self.limits.state_dir is not None:
            # Should the node die hard, its next start ends this job's process group too.
            nodestate.record_job(self.limits.state_dir, job.id, process.pid, docker)
        try:
            await self._watch(job, process)
        finally:
            if self.limits.state_dir is not None:
                nodestate.remove(nodestate.job_record(self.limits.state_dir, job.id))

    async def _watch(self, job: Job, process: asyncio.subprocess.Process) -> None:
        if job.cancel_requested:  # cancelled while it was starting
            _signal_group(process.pid, signal.SIGKILL)
        elif job.status == "queued":
            job.status = "running"
        assert process.stdout is not None
        reader = asyncio.create_task(self._read(job, process.stdout))
        code = await process.wait()
        try:
            await asyncio.wait_for(asyncio.shield(reader), DRAIN_S)
        except TimeoutError:
            # A child it left behind still holds the pipe: the job is over, so is the child.
            _signal_group(process.pid, signal.SIGKILL)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        _end_strays(job)  # what it started in a session of its own (a daemon) ends with it
        if job.image is not None and code < 0:
            # The docker client was killed, not its container (SIGKILL is not proxied): the
            # slot stays taken until the daemon removed it, or the next job shares the GPU.
            await _remove_container(job)
        if job.cancel_requested:
            self._finish(job, "cancelled", code, "cancelled")
        elif code == 0:
            job.progress = 1.0
            self._finish(job, "completed", code, None)
        else:
            last = job.lines[-1][1] if job.lines else ""
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            self._finish(job, "failed", code, clip(f"{how}: {last}" if last else how, 1_000))

    async def _read(self, job: Job, stream: asyncio.StreamReader) -> None:
        limit = self.limits.line_bytes
        buffer = bytearray()
        skipping = False  # inside a line already cut at `limit`: drop the rest of it
        while chunk := await stream.read(READ_CHUNK):
            buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > limit:
                        if not skipping:
                            job.add_line(_text(_cut(buffer, limit)) + " …[cut]")
                        skipping = True
                        buffer.clear()
                    break
                if not skipping:
                    line = _cut(buffer[:end], limit)
                    job.add_line(_text(line) + (" …[cut]" if end > limit else ""))
                skipping = False
                del buffer[: end + 1]
        if buffer and not skipping:
            job.add_line(_text(_cut(buffer, limit)))

    def _finish(self, job: Job, status: str, code: int | None, error: str | None) -> None:
        if job.status in TERMINAL:
            return
        job.status = status
        job.exit_code = code
        job.error = error
        job.ended_at = time.time()

    def cancel(self, job: Job) -> Job:
        """SIGTERM to the job's process group now, SIGKILL after the grace; idempotent."""
        if job.status in TERMINAL or job.cancel_requested:
            return job
        if job.process is None:  # still queued (or starting): it never runs
            job.cancel_requested = True
            self._finish(job, "cancelled", None, "cancelled before it started")
        elif job.process.returncode is None:  # once it has exited, its own ending stands
            job.cancel_requested = True
            _signal_job(job, signal.SIGTERM)
            asyncio.get_running_loop().call_later(self.limits.cancel_grace_s, _kill_if_running, job)
        return job

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop every job (the node is stopping): none outlives the node."""
        self.closing = True
        for job in list(self.jobs.values()):
            if job.status not in TERMINAL:
                self.cancel(job)
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace_s)
        for job in self.jobs.values():
            _kill_if_running(job)
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_S + 1)


def _docker_argv(
    docker: str, job_id: str, image: str, command: list[str], env: dict[str, str], folder: str
) -> list[str]:
    # `-e NAME` takes the value from docker's own environment: no value shows in `ps`.
    argv = [docker, "run", "--rm", "--name", f"procure-{job_id}"]
    for name in sorted(env):
        argv += ["-e", name]
    if checkpoints.is_local(folder):
        argv += ["-v", f"{folder}:{folder}"]  # the same path inside, so the env var holds
    resume = env.get("PROCURE_RESUME_FROM")
    if resume and checkpoints.is_local(resume):
        parent = str(checkpoints.local_path(resume).resolve().parent)
        if parent != folder:
            argv += ["-v", f"{parent}:{parent}:ro"]
    return [*argv, image, *command]


def _cut(raw: bytes | bytearray, limit: int) -> bytes:
    """At most `limit` bytes of `raw`, never half a UTF-8 character."""
    if len(raw) <= limit:
        return bytes(raw)
    end = limit
    while end > 0 and raw[end] & 0xC0 == 0x80:  # a continuation byte: back to its start
        end -= 1
    return bytes(raw[:end])


def _text(raw: bytes | bytearray) -> str:
    return clip(bytes(raw).decode("utf-8", "replace").rstrip("\r"), 1 << 20)


PR_SET_PDEATHSIG = 1
# The C library's prctl, looked up here in the node: between fork and exec (another thread may
# hold the loader's lock) the child only calls it. Linux only.
_DIE_WITH_NODE = sys.platform == "linux"
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if _DIE_WITH_NODE else None


def _die_with_node(node_pid: int) -> None:
    """In the job's process before exec: SIGKILL it when the node dies, even killed with SIGKILL
    (nothing else then stops it, and a job left running holds the GPU while it runs elsewhere).
    Its own children and containers are ended at the node's next start (nodestate)."""
    assert _PRCTL is not None
    _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != node_pid:  # the node died before prctl took hold
        os._exit(1)


PR_SET_DUMPABLE = 4


def _hide_node_environment() -> None:
    """Make the node process non-dumpable before it runs a job: the job runs as the node's user,
    and could otherwise read the node's token and GPU_WORKER_ON_ORPHAN (a cloud API key) from
    /proc/<node>/environ, whatever env the runner hands it. A job's own exec makes it dumpable
    again. (Also: no core dump of the node, and attaching a debugger to it needs root.)"""
    if _PRCTL is not None:
        _PRCTL(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _signal_job(job: Job, sig: signal.Signals) -> None:
    """`sig` to the job's process group and to every process of the job outside it."""
    if job.process is not None:
        _signal_group(job.process.pid, sig)
    for pid in nodestate.job_processes(job.id, job.process.pid if job.process else None):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


STRAY_ROUNDS = 20  # a daemon that forks as fast as it is killed: a bounded number of sweeps


def _end_strays(job: Job) -> None:
    """SIGKILL the job's process group and, sweep after sweep until none is left, every process
    of the job that left it (setsid, a daemon's double fork: no group signal reaches those)."""
    if job.process is not None:
        _signal_group(job.process.pid, signal.SIGKILL)
    for _ in range(STRAY_ROUNDS):
        # By its id only: the leader has exited, so its children went to init, and its pid may
        # already name another process, whose children are none of this job's.
        strays = nodestate.job_processes(job.id, None)
        if not strays:
            return
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    log.warning("job %s: processes it started still appear after %d sweeps", job.id, STRAY_ROUNDS)


def _kill_if_running(job: Job) -> None:
    if job.process is not None and job.process.returncode is None:
        _signal_job(job, signal.SIGKILL)
        if job.image is not None:
            # SIGKILL cannot be proxied into the container: ask the daemon to remove it.
            task = asyncio.get_running_loop().create_task(_remove_container(job))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()


async def _remove_container(job: Job) -> None:
    with contextlib.suppress(OSError):
        process = await asyncio.create_subprocess_exec(
            job.argv[0],
            "rm",
            "-f",
            f"procure-{job.id}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 30)
