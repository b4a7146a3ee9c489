"""A newcomer's first hour with the `procure` command (issue 21): seeding vendors on other
ports, tables at 80 columns, quiet commands that say what they did, no false "port busy"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from procure.cli.vendors import seed_endpoints
from procure.local import LocalServer, port_is_free, start_facilitator


def procure(
    *args: str, env: dict[str, str], columns: int = 200
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDA_", "PROCURE_"))}
    return subprocess.run(
        [sys.executable, "-m", "procure.cli", *args],
        env={**clean, "COLUMNS": str(columns), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}",
        "PROCURE_HOME": str(tmp_path / "home"),
        "GPU_VENDOR_SECRET": "first-hour-secret",
    }


@pytest.fixture
def facilitator(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_facilitator(tmp_path / "chain.json")
    yield server
    server.stop()


def test_seed_on_other_ports_builds_valid_endpoints(
    env: dict[str, str], facilitator: LocalServer
) -> None:
    env = {**env, "X402_FACILITATOR_URL": facilitator.url}
    seeded = procure(
        "vendors", "seed", "--host", "127.0.0.1", "--port", "5101", "--port", "5102", env=env
    )
    assert seeded.returncode == 0, seeded.stderr
    assert "gpu_vendor_1" in seeded.stdout and "http://127.0.0.1:5101" in seeded.stdout
    vendors = json.loads(procure("vendors", "list", "--json", env=env).stdout)
    assert [v["endpoint"] for v in vendors] == ["http://127.0.0.1:5101", "http://127.0.0.1:5102"]
    assert all(v["network"] and v["asset"] for v in vendors)

    cleared = procure("vendors", "clear-cooldown", "gpu_vendor_1", env=env)
    assert cleared.returncode == 0 and "cooldown cleared" in cleared.stdout
    table = procure("vendors", "list", env=env, columns=80).stdout
    assert "gpu_vendor_1" in table and "gpu_vendor_2" in table
    assert max(len(line) for line in table.splitlines()) <= 80


def test_seed_endpoints_from_host_and_ports() -> None:
    assert seed_endpoints("http://localhost", []) == ("http://localhost", (4001, 4002))
    assert seed_endpoints("127.0.0.1", [6001]) == ("http://127.0.0.1", (6001, 6002))
    assert seed_endpoints("https://h.example/", [1, 9]) == ("https://h.example", (1, 9))


@pytest.mark.parametrize(
    "host", ["http://localhost:5102", "localhost:5102", "ftp://x", "http://h/path"]
)
def test_seed_refuses_a_host_that_would_make_a_bad_url(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit):
        seed_endpoints(host, [])
    err = capsys.readouterr().err
    assert err.startswith("error: --host") and len(err.strip().splitlines()) == 1


def test_a_facilitator_that_is_not_there_is_one_line(env: dict[str, str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = procure("vendors", "seed", env={**env, "X402_FACILITATOR_URL": url})
    assert result.returncode == 1
    assert "X402_FACILITATOR_URL" in result.stderr and "Traceback" not in result.stderr


def test_run_list_at_80_columns_shows_the_whole_run_id(env: dict[str, str]) -> None:
    goal = "Fine-tune a tiny LLM on dataset-a for three epochs, then evaluate it on dataset-b"
    started = procure("run", "start", "--goal", goal, "--budget", "5", env=env)
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["_id"]  # stdout: the run as JSON; the note on stderr
    assert "does not refund a paid slice" in started.stderr
    listed = procure("run", "list", env=env, columns=80)
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout  # whole, on one line: the next command needs it
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    assert "INFO" not in listed.stdout + listed.stderr  # no migration chatter
    spend = procure("spend", env=env)
    assert spend.returncode == 0, spend.stderr
    assert spend.stdout.startswith("total $0.00 over 1 run(s): paid $0.00")


def test_fleet_once_without_a_cloud_key_is_one_line_and_fails(env: dict[str, str]) -> None:
    result = procure("fleet", "run", "--once", env=env)
    assert result.returncode == 1
    assert "LAMBDA_API_KEY is not set" in result.stderr
    assert "INFO" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_worker_once_is_quiet_and_says_what_it_did(env: dict[str, str]) -> None:
    result = procure("worker", "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert "Running upgrade" not in result.stdout + result.stderr
    assert "ticks" in result.stdout


def test_a_port_just_freed_is_not_busy() -> None:
    # A server (SO_REUSEADDR, as uvicorn's) that accepted a connection and closed it first
    # leaves the port in TIME_WAIT for a minute: a plain bind fails, the server could start
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection waits
    client.close()
    assert not port_is_free(port)  # still listening: busy
    server.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old probe did: a false "busy"
    assert port_is_free(port)
