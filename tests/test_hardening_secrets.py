"""Secrets stay put: planted secrets (a Slack webhook's path, a password in the cloud's URL, the
node token, the orchestrator secret, the API token) never appear in what `procure fleet run`
prints or logs (the HTTP library's request lines included), in /healthz, /metrics, the fleet's
API or the dashboard; and a background task that cannot do its work says so in /healthz."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from fleet_mock_world import KEY, start_mock
from procure.api.app import create_app
from procure.clouds.lambda_cloud.pacing import unpaced
from procure.clouds.lambda_cloud.settings import LambdaSettings
from procure.fleet.inprocess import FleetRun
from procure.fleet.settings import FleetSettings
from procure.local import LocalServer, free_port, serve
from procure.settings import Settings
from procure.store import open_store

HOOK_SECRET = "PLANTEDHOOK7f3a9"
URL_PASSWORD = "PLANTEDPW51c2"
NODE_TOKEN = "PLANTEDNODE8e1d"
ORCH_SECRET = "PLANTEDORCH4b7c"
SECRETS = (HOOK_SECRET, URL_PASSWORD, NODE_TOKEN, ORCH_SECRET)
PROCURE = str(Path(sys.executable).with_name("procure"))


@pytest.fixture
def slack() -> Iterator[tuple[LocalServer, list[str]]]:
    received: list[str] = []
    app = FastAPI()

    @app.post("/services/T000/B000/{hook}")
    async def hook(hook: str, request: Request) -> PlainTextResponse:
        received.append((await request.body()).decode())
        return PlainTextResponse("ok")

    server = serve(app)
    yield server, received
    server.stop()


def clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROCURE_", "LAMBDA_", "SLACK_", "ORCHESTRATOR", "GPU_"))
    }
    env.update(
        PROCURE_DATABASE_URL=f"sqlite:///{tmp_path / 'procure.db'}",
        PROCURE_HOME=str(tmp_path / "home"),
        LAMBDA_LABS_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        LAMBDA_LABS_NODE_TOKEN=NODE_TOKEN,
        ORCHESTRATOR_SECRET=ORCH_SECRET,
        **values,
    )
    return env


def fleet_once(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROCURE, "fleet", "run", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_fleet_run_keeps_the_webhook_and_url_passwords_out_of_its_output(
    tmp_path: Path, slack: tuple[LocalServer, list[str]]
) -> None:
    server, received = slack
    mock = start_mock()
    try:
        # A scan that works: the pool is below its minimum, the dry run blocks the launch and
        # announces it on Slack (through the webhook, whose path is the secret).
        env = clean_env(
            tmp_path,
            LAMBDA_API_URL=mock.url,
            LAMBDA_API_KEY=KEY,
            LAMBDA_LABS_MIN_INSTANCES="1",
            SLACK_WEBHOOK_URL=f"{server.url}/services/T000/B000/{HOOK_SECRET}",
        )
        done = fleet_once(tmp_path, env)
        assert done.returncode == 0, done.stderr
        assert received and "dry run" in received[0]  # the message did go out
        printed = done.stdout + done.stderr
        assert "fleet controller" in printed
        for secret in SECRETS:
            assert secret not in printed
    finally:
        mock.stop()

    # A cloud URL with a password in it, and nothing listening: the one scan fails, so the
    # command exits non-zero and says why, without the password.
    env = clean_env(
        tmp_path,
        LAMBDA_API_URL=f"http://procure:{URL_PASSWORD}@127.0.0.1:{free_port()}",
        LAMBDA_API_KEY=KEY,
    )
    failed = fleet_once(tmp_path, env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "the scan failed" in failed.stderr
    for secret in SECRETS:
        assert secret not in failed.stdout + failed.stderr


def test_healthz_shows_a_failing_background_task_and_no_secret(
    tmp_path: Path, slack: tuple[LocalServer, list[str]]
) -> None:
    server_, _received = slack
    db_url = f"sqlite:///{tmp_path / 'procure.db'}"
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path)
    store = open_store(db_url)
    cfg = FleetSettings(
        LAMBDA_LABS_NODE_TOKEN=NODE_TOKEN,
        SLACK_WEBHOOK_URL=f"{server_.url}/services/T000/B000/{HOOK_SECRET}",
        LAMBDA_LABS_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        LAMBDA_LABS_FLEET_NAME="health",
    )
    run = FleetRun(
        cfg=cfg,
        cloud=LambdaSettings(
            api_key=KEY, api_url=f"http://procure:{URL_PASSWORD}@127.0.0.1:{free_port()}"
        ),
        pacer=unpaced(),
        interval_s=0.1,
    )
    server = serve(create_app(settings, store, fleet=run))
    try:
        deadline = time.monotonic() + 30
        while True:
            health = httpx.get(f"{server.url}/healthz", timeout=10)
            assert health.status_code == 200
            state = health.json().get("background", {}).get("fleet-controller", "")
            if state.startswith("scan failed"):
                break
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.1)
        assert health.json()["status"] == "degraded"
        answers = [health.text]
        for path in ("/metrics", "/api/fleet/summary", "/api/fleet/actions", "/", "/fleet"):
            answer = httpx.get(f"{server.url}{path}", timeout=10)
            assert answer.status_code == 200, path
            answers.append(answer.text)
        for text in answers:
            for secret in SECRETS:
                assert secret not in text
    finally:
        server.stop()
        store.dispose()
