"""The node's dead-man switch: its controller holds a lease (`POST /lease {"ttl_s", "holder"}`)
and renews it; when a lease lapses without renewal the node runs its stop action
(`GPU_WORKER_ON_ORPHAN`, e.g. `shutdown -h now`), so an instance whose controller died is not
left running (and billing) forever. Off unless the action is configured; can be disarmed. The
lease is kept on disk too, so a node that crashed and was restarted still stops on time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from procure.gpu import nodestate

log = logging.getLogger(__name__)
RETRY_MIN_S = 30.0  # a stop action that failed runs again after this, doubling each time
RETRY_MAX_S = 600.0


async def run_shell(command: str, timeout_s: float) -> int:
    """Run the stop action; its exit status (-1: it outlived `timeout_s` and was killed). Its
    output is not logged: the command may carry a credential and echo it."""
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        return await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1


class DeadMan:
    """Lease state and the watcher that fires once per lapse. `clock` is monotonic seconds."""

    def __init__(
        self,
        action: str | None,
        *,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        run: Callable[[str, float], Awaitable[int]] = run_shell,
        path: Path | None = None,
        retry_s: float = RETRY_MIN_S,
    ) -> None:
        self._action = action
        self._retry_min_s = retry_s
        self._retry_s = retry_s
        self._retry_at: float | None = None  # when a failed stop action runs again
        self._path = path  # where the lease is kept (None: in memory only)
        self._timeout_s = timeout_s
        self._clock = clock
        self._run = run
        self._changed = asyncio.Event()
        self.state = "off" if action is None else "idle"  # idle | armed | fired | disarmed
        self.holder: str | None = None
        self.ttl_s: float | None = None
        self.expires_at: float | None = None
        self.fired_reason: str | None = None
        self.exit_status: int | None = None

    @property
    def enabled(self) -> bool:
        return self._action is not None

    def renew(self, holder: str, ttl_s: float) -> dict[str, Any]:
        """Take or renew the lease: the stop action runs `ttl_s` from now unless renewed."""
        if self.holder not in (None, holder):
            log.info("lease taken over by %s from %s", holder, self.holder)
        self.holder, self.ttl_s = holder, ttl_s
        self.expires_at = self._clock() + ttl_s
        self.state, self.fired_reason, self.exit_status = "armed", None, None
        self._retry_at = None
        self._save()
        self._changed.set()
        return self.to_json()

    def disarm(self) -> dict[str, Any]:
        if self.state == "armed":
            log.info("dead-man switch disarmed (lease of %s dropped)", self.holder)
        self.state = "disarmed" if self.enabled else "off"
        self.expires_at = None
        self._retry_at = None
        self._save()
        self._changed.set()
        return self.to_json()

    def restore(self) -> None:
        """At start: take up the lease a previous run of the node held (crashed, or restarted
        while its controller was gone, nobody renews it); already lapsed, it fires at once."""
        saved = nodestate.read_json(self._path) if self._path and self.enabled else None
        if saved is None or nodestate.alive(saved.get("node")):
            return  # none, or a node that still runs holds it
        try:
            holder = str(saved["holder"])
            ttl_s, expires = float(saved["ttl_s"]), float(saved["expires_at"])
        except (KeyError, TypeError, ValueError, OverflowError):  # an int beyond a float too
            return
        if not (math.isfinite(ttl_s) and math.isfinite(expires)):
            return
        # Kept as wall-clock time: the monotonic clock of the run that wrote it is gone.
        left = expires - time.time()
        self.holder, self.ttl_s = holder, ttl_s
        self.expires_at = self._clock() + left
        self.state, self.fired_reason, self.exit_status = "armed", None, None
        log.warning(
            "took up the lease of %s from before the node restarted (%.0fs left)", holder, left
        )
        self._save()  # this run holds it now
        self._changed.set()

    def release(self) -> None:
        """At a clean stop: drop the lease from disk. Whoever stopped the node took over (an
        operator, the machine going down); only a node that died keeps it for its next start."""
        if self._path is None:
            return
        saved = nodestate.read_json(self._path)
        owner = saved.get("node") if saved else None
        if owner == nodestate.me() or not nodestate.alive(owner):  # not another node's
            nodestate.remove(self._path)

    def _save(self) -> None:
        if self._path is None:
            return
        if self.state != "armed" or self.expires_at is None:
            nodestate.remove(self._path)  # nothing for a restart to take up
            return
        lease = {
            "holder": self.holder,
            "ttl_s": self.ttl_s,
            "expires_at": time.time() + (self.expires_at - self._clock()),
            "node": nodestate.me(),
        }
        try:
            nodestate.write_json(self._path, lease)
        except OSError as exc:  # the lease holds in memory; only a crash would lose it
            log.warning("cannot keep the lease on disk at %s: %s", self._path, exc)

    def to_json(self) -> dict[str, Any]:
        left = None if self.expires_at is None else round(self.expires_at - self._clock(), 3)
        return {
            "state": self.state,
            "holder": self.holder,
            "ttl_s": self.ttl_s,
            "expires_in_s": left,
            "fired_reason": self.fired_reason,
            "exit_status": self.exit_status,
        }

    async def watch(self) -> None:
        """Sleep until the lease would lapse (or changes); fire when it lapses. Runs forever."""
        while True:
            self._changed.clear()
            wait = None
            if self.state == "armed" and self.expires_at is not None:
                wait = max(0.0, self.expires_at - self._clock())
                if wait == 0.0:
                    await self._fire()
                    continue
            elif self.state == "fired" and self._retry_at is not None:
                wait = max(0.0, self._retry_at - self._clock())
                if wait == 0.0:
                    await self._act()
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    async def _fire(self) -> None:
        assert self._action is not None and self.ttl_s is not None
        self.state = "fired"
        # Dropped before the action runs: a `shutdown` ends the node mid-action, and the machine
        # started again later must not stop itself again for the same lapse.
        self._save()
        self.fired_reason = (
            f"the lease of {self.holder} lapsed: not renewed within its {self.ttl_s:g}s"
        )
        log.warning("%s; running the stop action (GPU_WORKER_ON_ORPHAN)", self.fired_reason)
        self._retry_s = self._retry_min_s
        await self._act()

    async def _act(self) -> None:
        """Run the stop action; one that failed runs again later (backing off), until it works
        or the lease is renewed or disarmed: a cloud API down for a minute at the lapse must
        not leave the orphaned instance billing for good."""
        assert self._action is not None
        self._retry_at = None
        try:
            status = await self._run(self._action, self._timeout_s)
        except Exception as exc:  # a broken action must not kill the watcher
            status = -1
            log.error("the stop action could not run: %s", type(exc).__name__)
        if self.state != "fired":
            return  # renewed or disarmed while it ran: its outcome no longer matters
        self.exit_status = status
        log.warning("the stop action exited with status %s", status)
        if status != 0:
            self._retry_at = self._clock() + self._retry_s
            log.warning("running the stop action again in %.0fs", self._retry_s)
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
