"""Opening a store migrates it: from nothing, from an older revision, and not at all (without
loading Alembic) when it is already at the newest."""

from __future__ import annotations

import subprocess
import sys

from alembic import command
from alembic.script import ScriptDirectory

from procure.store import open_store
from procure.store.db import HEAD, MIGRATIONS, alembic_config, make_engine, revision


def test_head_is_the_newest_migration() -> None:
    assert ScriptDirectory(str(MIGRATIONS)).get_heads() == [HEAD]


def test_a_new_store_is_migrated_and_an_old_one_upgraded(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        assert revision(engine) is None
        open_store(empty_db_url).dispose()
        assert revision(engine) == HEAD
        command.downgrade(alembic_config(empty_db_url), "0008")
        assert revision(engine) == "0008"
        open_store(empty_db_url).dispose()
        assert revision(engine) == HEAD
    finally:
        engine.dispose()


def test_a_store_at_the_newest_revision_opens_without_alembic(db_url: str) -> None:
    code = (
        "import sys; from procure.store import open_store; "
        f"open_store({db_url!r}).dispose(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_processes_opening_a_new_store_at_once_all_start(empty_db_url: str) -> None:
    """Before the fix: the README's PostgreSQL recipe (`serve --no-worker &`, two `worker &`) on
    a new database raced its migrations: two of three processes died with a duplicate key in
    pg_type, and the first thing a newcomer saw was a worker gone."""
    opens = "import sys; from procure.store import open_store; open_store(sys.argv[1])"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", opens, empty_db_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    said = [p.communicate(timeout=120)[0] for p in starts]
    assert [p.returncode for p in starts] == [0] * 4, said
    assert revision(make_engine(empty_db_url)) == HEAD
