"""What a run keeps of a vendor's log: a bounded number of lines per poll and per run, each line
of bounded length, and a note saying what was cut instead of cutting silently."""

from __future__ import annotations

from dataclasses import dataclass

from procure.bounds import clip
from procure.safetext import scrub

LINE_CHARS = 2_000
"""One log line kept, at most (the rest is cut, and the line says so)."""
LINES_PER_POLL = 200
"""New lines kept from one poll: the latest ones (a vendor that floods is cut, not stored)."""
LINES_PER_RUN = 5_000
"""Lines kept over a whole run; past it the run notes once that further lines are not kept."""


@dataclass(frozen=True)
class KeptLines:
    lines: list[str]
    notes: list[str]
    counted: int
    """What to add to the run's count of kept lines (one more once the limit is noted, so that
    it is noted only once)."""


def keep(new_lines: list[str], kept_so_far: int) -> KeptLines:
    """Which of a poll's `new_lines` a run that already kept `kept_so_far` lines keeps, and the
    notes that say what was dropped."""
    notes: list[str] = []
    lines = new_lines
    if kept_so_far > LINES_PER_RUN:  # past the run's limit (noted once): nothing kept or said
        return KeptLines([], [], 0)
    if len(lines) > LINES_PER_POLL:
        dropped = len(lines) - LINES_PER_POLL
        notes.append(
            f"{dropped:,} log lines dropped: {len(lines):,} new lines in one poll, "
            f"the latest {LINES_PER_POLL} are kept"
        )
        lines = lines[-LINES_PER_POLL:]
    room = max(0, LINES_PER_RUN - kept_so_far)
    noted = 0
    if len(lines) > room:
        if kept_so_far <= LINES_PER_RUN:  # the first time the limit bites: say it, once
            notes.append(
                f"Log limit of {LINES_PER_RUN:,} lines for this run reached: "
                f"{len(lines) - room:,} lines dropped here, later lines are not kept"
            )
            noted = 1
        lines = lines[:room]
    # Exact replacement only (no bearer-like patterns): a log line is otherwise kept as it is.
    kept = [clip(scrub(line), LINE_CHARS) for line in lines]
    return KeptLines(kept, notes, len(lines) + noted)
