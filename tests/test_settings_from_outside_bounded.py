"""Settings read outside the settings classes are bounded like the rest: the worker's tick-log
retention (a negative one would prune the whole log) and the serverless cron's time budget; and
the GPU node's state records stay whole when several nodes of one process write at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from procure.agent.worker import WorkerConfig
from procure.api.serverless import create_serverless_app
from procure.gpu import nodestate
from procure.numbers import NumberError
from procure.settings import Settings


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e400", "seven"])
def test_a_tick_log_retention_that_is_not_a_sane_number_keeps_the_default(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before the fix: PROCURE_TICK_LOG_DAYS=-1 was taken as is, and the pruner deleted every
    row of the tick log older than tomorrow: all of it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROCURE_TICK_LOG_DAYS", value)
    monkeypatch.setenv("PROCURE_TICK_LOG_PER_RUN", value)
    cfg = WorkerConfig()
    assert cfg.tick_log_days == 7.0 and cfg.tick_log_per_run == 1000


def test_the_tick_log_retention_is_read_from_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before the fix: only the environment was read, while README and `.env.example` say every
    setting may be in `.env`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROCURE_TICK_LOG_DAYS", raising=False)
    (tmp_path / ".env").write_text("PROCURE_TICK_LOG_DAYS=30\n")
    assert WorkerConfig().tick_log_days == 30.0


@pytest.mark.parametrize("value", ["nan", "-5", "0", "1e9"])
def test_a_cron_budget_out_of_range_is_refused_naming_it(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before the fix: `float()` took nan (every cron call then ended at once, ticking nothing)
    and a negative budget."""
    monkeypatch.setenv("PROCURE_CRON_BUDGET_S", value)
    settings = Settings(
        PROCURE_DATABASE_URL=f"sqlite:///{tmp_path / 'p.db'}",
        PROCURE_HOME=tmp_path,
        X402_FACILITATOR_URL="http://127.0.0.1:9",
    )  # type: ignore[call-arg]
    with pytest.raises(NumberError, match="PROCURE_CRON_BUDGET_S"):
        create_serverless_app(settings)


def test_nodes_of_one_process_writing_their_state_at_once_keep_every_record_whole(
    tmp_path: Path,
) -> None:
    """Before the fix: the temporary file was named by the process id alone, so two simulated
    nodes in one process renaming it at once failed ("cannot keep the lease on disk")."""
    path = tmp_path / "lease.json"
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for k in range(200):
                nodestate.write_json(path, {"writer": n, "k": k, "pad": "x" * 2000})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    record = nodestate.read_json(path)
    assert record is not None and record["k"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["lease.json"]  # no temporary left behind
