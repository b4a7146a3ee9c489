"""Crash benchmark: kill the worker 1,000+ times at random moments and at named crash points,
then prove that no money was lost or paid twice (see `tests/crash_harness.py`).

    .venv/bin/python benchmarks/crash.py --kills 1000
    .venv/bin/python benchmarks/crash.py --kills 1000 \\
        --database-url postgresql+psycopg://postgres:postgres@127.0.0.1:5432/procure_crash

Prints the figures as JSON (kills by signal and by crash point, runs, payments, transfers,
vendor submissions, starts and idempotent replays, seconds) and exits non-zero on any
invariant violation. `--check-every N` checks the invariants after every N-th death (default
10; the final check is always made).
"""

from __future__ import annotations

import sys
from pathlib import Path

# the harness is a test tool, kept with the tests rather than shipped in the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crash_harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
