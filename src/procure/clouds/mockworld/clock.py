"""A simulation clock: simulated seconds since start, running `speed` times faster than the wall
clock, and advanced by hand on top (tests and demos jump ahead without sleeping)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class SimClock:
    """`now()` in simulated seconds. Thread-safe: the mock cloud and its nodes read it from
    several threads."""

    def __init__(self, speed: float = 1.0, wall: Callable[[], float] = time.monotonic) -> None:
        if speed < 0:
            raise ValueError("speed must be 0 (manual) or more")
        self._wall = wall
        self._lock = threading.Lock()
        self._base = 0.0
        self._at = wall()
        self._speed = speed

    @property
    def speed(self) -> float:
        return self._speed

    def now(self) -> float:
        with self._lock:
            return self._base + (self._wall() - self._at) * self._speed

    def advance(self, seconds: float) -> float:
        """Jump `seconds` ahead (never back: the simulation's events only move forward)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._rebase()
            self._base += seconds
            return self._base

    def set_speed(self, speed: float) -> None:
        if speed < 0:
            raise ValueError("speed must be 0 (manual) or more")
        with self._lock:
            self._rebase()
            self._speed = speed

    def _rebase(self) -> None:
        wall = self._wall()
        self._base += (wall - self._at) * self._speed
        self._at = wall
