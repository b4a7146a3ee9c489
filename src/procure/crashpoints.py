"""Named crash points for crash testing: `crash_point("signed")` kills the process on the spot
(`os._exit(137)`, as a SIGKILL would) with the probability given for that point.

Configured by the environment, read once at import: ``PROCURE_CRASH_AT=<point>:<probability>``,
several separated by commas, ``*`` for every point (e.g. ``signed:0.2,paid:0.2`` or ``*:0.05``).
``<point>@<k>`` dies at the k-th time this process reaches the point, exactly (crash tests that
must cover every point whatever the machine's speed schedule their deaths this way, e.g.
``paid@2``). ``PROCURE_CRASH_LOG`` names a file that gets one line (the point's name) per
crash, appended just before dying. Unset (always, outside crash tests), a crash point costs
one truth test.

Imports nothing of the project, so any layer (agent, payments) may place crash points.
"""

from __future__ import annotations

import os
import random
from collections import Counter

ENV = "PROCURE_CRASH_AT"
LOG_ENV = "PROCURE_CRASH_LOG"

# The points placed in the code, for documentation and for validating a configuration.
POINTS = frozenset(
    {
        "intent",  # the payment intent is durable; nothing signed yet
        "signed",  # the x402 authorisation is signed, not yet sent to the vendor
        "paid",  # the vendor answered (paid, job started); nothing of it recorded yet
        "recorded",  # the payment and the job start are recorded
        "polled",  # the vendor's job status is in hand, not yet written
        "reconciled",  # reconciliation learnt the outcome, not yet written
        "refused",  # a refused payment's outcome is known, not yet written
        "cancel_sent",  # the vendor confirmed a job's cancel; the run not yet ended
        "fleet_intent",  # a fleet action is durably `executing`; the cloud not yet called
        "fleet_launched",  # the cloud launched the instance; nothing of it recorded yet
        "fleet_terminated",  # the cloud terminated the instance; nothing of it recorded yet
    }
)

_rng = random.SystemRandom()  # fork-safe: forked workers never share a sequence
_points: dict[str, float] = {}
_nth: dict[str, int] = {}  # point -> the hit (1-based) at which to die
_hits: Counter[str] = Counter()
_log: str | None = None


def parse(spec: str) -> dict[str, float]:
    """``"a:0.1,b:0.5"`` → ``{"a": 0.1, "b": 0.5}``; unknown points are an error."""
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, probability = item.partition(":")
        if name != "*" and name not in POINTS:
            raise ValueError(f"{ENV}: unknown crash point {name!r} (known: {sorted(POINTS)})")
        value = float(probability or 1.0)
        if not 0 <= value <= 1:
            raise ValueError(f"{ENV}: probability of {name} must be in [0, 1], got {value}")
        points[name] = value
    if "*" in points:
        star = points.pop("*")
        points = {name: points.get(name, star) for name in POINTS}
    return points


def parse_nth(spec: str) -> dict[str, int]:
    """The ``point@k`` items of a configuration: ``"paid@2,intent:0.1"`` → ``{"paid": 2}``."""
    nth: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, at, k = item.partition("@")
        if not at:
            continue
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown crash point {name!r} (known: {sorted(POINTS)})")
        if not k.isdecimal() or int(k) < 1:
            raise ValueError(f"{ENV}: {item!r}: the hit to die at must be a whole number >= 1")
        nth[name] = int(k)
    return nth


def configure(spec: str | None, log_path: str | None = None) -> None:
    """Set the crash points (None or "" turns them all off) and start counting hits afresh."""
    global _points, _nth, _log
    items = [part for part in (spec or "").split(",") if "@" not in part]
    _points = parse(",".join(items))
    _nth = parse_nth(spec or "")
    _hits.clear()
    _log = log_path


def crash_point(name: str) -> None:
    """Die here, now, with the probability configured for `name` (or at its k-th hit)."""
    if _points or _nth:
        _maybe_crash(name)


def _maybe_crash(name: str) -> None:
    probability = _points.get(name, 0.0)
    nth = _nth.get(name)
    if nth is not None:
        _hits[name] += 1
    if (nth is not None and _hits[name] == nth) or (probability and _rng.random() < probability):
        if _log:
            with open(_log, "a") as f:
                f.write(name + "\n")
        os._exit(137)


configure(os.environ.get(ENV), os.environ.get(LOG_ENV))
