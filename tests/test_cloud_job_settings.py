"""What a rented instance runs is the operator's to say: PROCURE_CLOUD_COMMAND and
PROCURE_CLOUD_CHECKPOINT_DIR reach the agent's cloud runs and the gateway's jobs, bad values are
refused without being echoed, and a checkpoint store no other instance can reach is warned of."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from procure.agent.runtime import close_deps, make_deps
from procure.clouds.job import CloudJobSettings
from procure.settings import Settings
from procure.store import open_store


def _deps(tmp_path: Path, clouds: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
    settings = Settings(DATABASE_URL=f"sqlite:///{tmp_path / 'p.db'}", PROCURE_HOME=tmp_path)
    store = open_store(settings.database_url)
    return make_deps(settings, store, clouds=clouds), store


def test_the_configured_command_and_checkpoint_store_reach_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCURE_CLOUD_COMMAND", "python -m mylab.train --epochs '3 more'")
    monkeypatch.setenv("PROCURE_CLOUD_CHECKPOINT_DIR", "s3://lab-bucket/procure")
    deps, store = _deps(tmp_path, clouds={})
    try:
        assert deps.cloud.command == ("python", "-m", "mylab.train", "--epochs", "3 more")
        assert deps.cloud.checkpoint_dir == "s3://lab-bucket/procure"
    finally:
        asyncio.run(close_deps(deps))
        store.dispose()


def test_unset_means_the_example_job_and_each_nodes_own_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROCURE_CLOUD_COMMAND", raising=False)
    monkeypatch.setenv("PROCURE_CLOUD_CHECKPOINT_DIR", "")  # compose's ${VAR:-}: unset
    job = CloudJobSettings()
    assert job.argv == ("python", "examples/train.py")
    assert job.checkpoint_dir is None and not job.shared
    assert not CloudJobSettings(PROCURE_CLOUD_CHECKPOINT_DIR="/mnt/ckpt").shared
    assert not CloudJobSettings(PROCURE_CLOUD_CHECKPOINT_DIR="file:///mnt/ckpt").shared
    assert CloudJobSettings(PROCURE_CLOUD_CHECKPOINT_DIR="gs://b/p").shared


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PROCURE_CLOUD_COMMAND", "python 'train.py --token=sk-secret-123"),  # unbalanced
        ("PROCURE_CLOUD_COMMAND", "   "),
        ("PROCURE_CLOUD_COMMAND", " ".join(["x"] * 65)),
        ("PROCURE_CLOUD_CHECKPOINT_DIR", "s3://bucket/a b?token=sk-secret-123"),
    ],
)
def test_a_bad_value_is_refused_without_being_echoed(name: str, value: str) -> None:
    with pytest.raises(ValidationError) as refused:
        CloudJobSettings(**{name: value})
    assert "sk-secret-123" not in str(refused.value)
    assert name in str(refused.value)


def test_clouds_without_a_shared_checkpoint_store_are_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-test-key-not-used")
    monkeypatch.delenv("PROCURE_CLOUD_CHECKPOINT_DIR", raising=False)
    with caplog.at_level(logging.WARNING, logger="procure.agent.runtime"):
        deps, store = _deps(tmp_path)
    try:
        assert "runpod" in deps.clouds
        assert any("starts over" in r.getMessage() for r in caplog.records)
    finally:
        asyncio.run(close_deps(deps))
        store.dispose()
    caplog.clear()
    monkeypatch.setenv("PROCURE_CLOUD_CHECKPOINT_DIR", "s3://lab-bucket/procure")
    with caplog.at_level(logging.WARNING, logger="procure.agent.runtime"):
        deps, store = _deps(tmp_path)
    try:
        assert not any("starts over" in r.getMessage() for r in caplog.records)
    finally:
        asyncio.run(close_deps(deps))
        store.dispose()
