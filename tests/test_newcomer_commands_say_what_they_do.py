"""A newcomer follows the README from a fresh clone: the demos pay from the wallet they fund,
a gateway or fleet without its cloud key says so in one line, servers say where they listen, every
option explains itself in --help, and a demo option of the other story is refused."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer.main

from cli_run import OURS, cli_env
from procure.cli.main import app
from procure.clouds.runpod.mock import start_mock_cloud
from procure.clouds.runpod.mockstate import RunPodMockConfig
from procure.local import LocalServer, free_port, start_facilitator

# A valid secp256k1 key that is not the demo's own wallet: its address holds nothing on the
# demo's fresh chain
_USERS_KEY = "0x" + "4c" * 32
_GATEWAY = (sys.executable, "-m", "procure.cli", "gateway")


def procure(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it, from a directory of their own (its `.env`, if any)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(OURS)}
    return subprocess.run(
        [sys.executable, "-m", "procure.cli", *args],
        cwd=tmp_path,
        env={**clean, "COLUMNS": "200", **extra},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_demo_pays_from_the_wallet_it_funded_whatever_the_env_key(tmp_path: Path) -> None:
    """Before the fix: with X402_PRIVATE_KEY in the environment or `.env` (as `.env.example`
    invites), `procure demo` funded a fresh wallet of its own but the agent paid from the key's
    wallet, empty on the demo's chain: "Insufficient balance", the run aborted, exit 1."""
    (tmp_path / ".env").write_text(f"X402_PRIVATE_KEY={_USERS_KEY}\n")
    result = procure(tmp_path, "demo", "--job-seconds", "0.5")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-1500:]
    assert "Insufficient balance" not in out
    assert "Training complete" in out


@pytest.fixture
def facilitator(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_facilitator(tmp_path / "chain.json")
    yield server
    server.stop()


def test_a_gateway_without_its_cloud_key_is_one_line_and_fails(
    tmp_path: Path, facilitator: LocalServer
) -> None:
    """Before the fix: `procure gateway --cloud runpod` without RUNPOD_API_KEY started anyway,
    quoted buyers an account it could not rent from, and printed a traceback at its first sweep
    ("AuthError: GET /v2/pods: RUNPOD_API_KEY is not set") instead of saying so and exiting."""
    env = cli_env(tmp_path, {"X402_FACILITATOR_URL": facilitator.url})
    try:
        result = subprocess.run(
            [*_GATEWAY, "--cloud", "runpod", "--port", str(free_port())],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the gateway kept running without a key: {exc.stderr!r}"[-800:])
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-800:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "RUNPOD_API_KEY" in lines[0]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The process's output, line by line, as it comes (read in a thread: never blocks)."""
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


def test_a_gateway_says_where_it_listens_and_whom_it_is_paid_to(
    tmp_path: Path, facilitator: LocalServer
) -> None:
    """Before the fix: `procure gateway` started silently (uvicorn at warning level, and no
    logging set up, so its own "selling runpod, paid to 0x..." line was dropped): a newcomer saw
    no address to give buyers and not the wallet the sales are paid to."""
    cloud = start_mock_cloud(RunPodMockConfig(nodes=False))
    port = free_port()
    env = cli_env(
        tmp_path,
        {
            "X402_FACILITATOR_URL": facilitator.url,
            "RUNPOD_API_KEY": "mock-runpod-key",
            "RUNPOD_API_URL": cloud.url,
        },
    )
    proc = subprocess.Popen(
        [*_GATEWAY, "--cloud", "runpod", "--port", str(port), "--vendor-id", "my_gpus"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _lines(proc)
        seen: list[str] = []
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            text = "".join(seen)
            if url in text and "paid to 0x" in text:
                break
        text = "".join(seen)
        assert url in text, text[-800:]
        assert "paid to 0x" in text, text[-800:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        cloud.stop()


@pytest.mark.parametrize(
    ("cloud", "var"),
    [("lambda", "LAMBDA_API_KEY"), ("runpod", "RUNPOD_API_KEY"), ("vast", "VAST_API_KEY")],
)
def test_a_fleet_without_its_cloud_key_says_so_and_exits(
    tmp_path: Path, cloud: str, var: str
) -> None:
    """Before the fix: only an unset LAMBDA_API_KEY was caught before the controller started. The
    blank one of `.env` copied from `.env.example` (as the README says), or any RunPod or
    Vast.ai fleet without its key, started a controller that warned "listing the fleet failed
    ... backing off 60s" at every scan and never exited."""
    (tmp_path / ".env").write_text(f"{var}=\n")  # as in .env.example
    try:
        result = subprocess.run(
            [sys.executable, "-m", "procure.cli", "fleet", "run", "--cloud", cloud],
            cwd=tmp_path,
            env=cli_env(tmp_path, {}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the controller kept running without a key: {exc.stderr!r}"[-800:])
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {var} is not set"), result.stderr


def test_serve_says_where_the_api_and_dashboard_are(tmp_path: Path) -> None:
    """Before the fix: `procure serve` hands uvicorn a socket it opened itself, so uvicorn's
    "running on http://..." line never came: the README sends a newcomer to the dashboard, and
    the server never said where it was."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", "serve", "--no-worker", "--port", str(port)],
        cwd=tmp_path,
        env=cli_env(tmp_path, {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _lines(proc)
        seen: list[str] = []
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and url not in "".join(seen):
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                if proc.poll() is not None:
                    break
                # Up and answering, yet silent about its address: the bug, no need to wait on
                if "Application startup complete" in "".join(seen):
                    break
        assert url in "".join(seen), "".join(seen)[-800:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _params(command: click.Command, path: str) -> Iterator[tuple[str, click.Parameter]]:
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _params(sub, f"{path} {name}")
    for param in command.params:
        if "--help" not in getattr(param, "opts", ()):
            yield path, param


def test_every_option_and_argument_explains_itself_in_help() -> None:
    """Before the fix: the README says "Every command explains itself with --help", but 16
    options and arguments had no text: `procure fleet actions --status` did not say which
    statuses there are, `--limit` of what, nor what `--json` of wallet, spend, ... prints."""
    silent = [
        f"{path} {'/'.join(param.opts)}"
        for path, param in _params(typer.main.get_command(app), "procure")
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert silent == []


def test_mock_vendor_names_the_ids_it_serves_in_one_line(tmp_path: Path) -> None:
    """Before the fix: `procure mock-vendor --help` offered "any seeded id", yet a vendor seeded
    in the store (`acme`, as the README registers one) was refused in a boxed "Invalid value"
    that named no option: only the seeds' two ids are served."""
    helped = procure(tmp_path, "mock-vendor", "--help")
    assert "any seeded id" not in helped.stdout
    result = procure(tmp_path, "mock-vendor", "--vendor-id", "acme", "--port", str(free_port()))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --vendor-id"), result.stderr
    assert "gpu_vendor_1" in lines[0] and "gpu_vendor_2" in lines[0]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("demo", "clouds", "--serve"), "--serve"),
        (("demo", "clouds", "--job-seconds", "1"), "--job-seconds"),
        (("demo", "--json"), "--json"),
    ],
)
def test_a_demo_option_of_the_other_story_is_refused_in_one_line(
    tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    """Before the fix: `procure demo clouds --serve` ran the clouds story and exited without any
    dashboard (and `--job-seconds` there, `--json` with the recovery story, were ignored too):
    a newcomer waiting for the printed URL got none, and no word why."""
    result = procure(tmp_path, *args)
    assert result.returncode == 2, (result.stdout + result.stderr)[-800:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert named in lines[0]
    assert "trace" not in result.stdout  # refused before any story ran
