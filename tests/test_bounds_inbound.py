"""Nothing a client sends can crash, stall or bloat one of our processes: real `procure serve`
and `procure facilitator` processes, sent 100,000 nested `[` (which once overflowed the C stack:
the EVM libraries raise Python's recursion limit so far that the JSON parser's guard never trips)
and bodies over the 1 MiB limit, answer a 4xx in the `{"error": ...}` envelope and keep serving.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from procure.bounds import MAX_REQUEST_BYTES
from procure.local import free_port

DEEP = b"[" * 100_000  # about 100 KB, far past any parser's recursion
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
TOO_LARGE = b'{"pad": "' + b"x" * (2 << 20) + b'"}'  # 2 MiB of otherwise harmless JSON


def _start(args: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", *args, "--port", str(port)],
        env={**os.environ, "COLUMNS": "200", **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{args[0]} exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{args[0]} did not start:\n{log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    """`procure serve --no-worker` on SQLite, as a real process."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp / 'procure.db'}",
        "PROCURE_HOME": str(tmp / "home"),
        "PROCURE_API_TOKEN": "s3cret",
    }
    proc = _start(["serve", "--no-worker"], env, port, tmp / "serve.log")
    yield f"http://127.0.0.1:{port}", proc
    _stop(proc)


@pytest.fixture(scope="module")
def facilitator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    """`procure facilitator`, as a real process."""
    tmp = tmp_path_factory.mktemp("facilitator")
    port = free_port()
    env = {
        "PROCURE_HOME": str(tmp / "home"),
        "PROCURE_WALLET_FUNDING": "10",
        "X402_FACILITATOR_URL": f"http://127.0.0.1:{port}",
    }
    proc = _start(["facilitator"], env, port, tmp / "facilitator.log")
    yield f"http://127.0.0.1:{port}", proc
    _stop(proc)


def _post(url: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        url, content=body, headers={"Content-Type": "application/json", **headers}, timeout=30
    )


def _still_serving(base: str, proc: subprocess.Popen) -> None:
    assert proc.poll() is None, f"the process died with {proc.returncode}"
    health = httpx.get(f"{base}/healthz", timeout=10)
    assert health.status_code == 200, health.text


def _raw_request(base: str, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send a request over a plain socket, tolerating a server that answers and closes before
    the whole body is written (as it should for a body over the limit); return its status and
    answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for start in range(0, len(body), 65536):
                sock.sendall(body[start : start + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["arrays", "objects"])
def test_deep_json_to_agent_start_is_a_400_and_the_server_lives(
    server: tuple[str, subprocess.Popen], body: bytes
) -> None:
    base, proc = server
    for headers in ({}, {"Authorization": "Bearer s3cret"}):  # refused before authentication
        answer = _post(f"{base}/api/agent-start", body, **headers)
        assert answer.status_code == 400, answer.text
        assert "nested deeper" in answer.json()["error"]
        _still_serving(base, proc)


def test_deep_json_in_an_x402_header_is_a_400(server: tuple[str, subprocess.Popen]) -> None:
    base, proc = server
    header = base64.b64encode(b"[" * 10_000).decode()
    answer = _post(f"{base}/api/agent-start", b"{}", **{"X-Payment": header})
    assert answer.status_code == 400 and "nests too deep" in answer.json()["error"]
    _still_serving(base, proc)


def test_a_body_over_one_mebibyte_is_a_413(server: tuple[str, subprocess.Popen]) -> None:
    base, proc = server
    assert len(TOO_LARGE) > MAX_REQUEST_BYTES
    # Declared with Content-Length: refused before reading it.
    head = (
        b"POST /api/agent-start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(TOO_LARGE)
    )
    status, answer = _raw_request(base, head, TOO_LARGE)
    assert status == 413
    assert b"request body too large: at most 1,048,576 bytes" in answer
    _still_serving(base, proc)
    # Chunked, without a length: refused once the limit is passed.
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(TOO_LARGE[i : i + 65536]), TOO_LARGE[i : i + 65536])
        for i in range(0, len(TOO_LARGE), 65536)
    )
    head = (
        b"POST /api/agent-start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    status, answer = _raw_request(base, head, chunks + b"0\r\n\r\n")
    assert status == 413 and b"request body too large" in answer
    _still_serving(base, proc)


def test_the_server_still_works_after_the_attacks(server: tuple[str, subprocess.Popen]) -> None:
    base, proc = server
    for body in (DEEP, TOO_LARGE[: MAX_REQUEST_BYTES + 10]):
        assert _post(f"{base}/api/agent-start", body).status_code in (400, 413)
    started = httpx.post(
        f"{base}/api/agent-start",
        json={"userId": "u", "goal": "g", "budgetTotal": 5},
        headers={"Authorization": "Bearer s3cret"},
        timeout=10,
    )
    assert started.status_code == 201, started.text
    _still_serving(base, proc)


@pytest.mark.parametrize("path", ["/verify", "/settle"])
def test_deep_json_to_the_facilitator_is_a_4xx_and_it_lives(
    facilitator: tuple[str, subprocess.Popen], path: str
) -> None:
    base, proc = facilitator
    for body in (DEEP, DEEP_OBJECT):
        answer = _post(f"{base}{path}", body)
        assert 400 <= answer.status_code < 500, answer.text
        assert "error" in answer.json()
        _still_serving(base, proc)
    status, answer = _raw_request(
        base,
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), len(TOO_LARGE)),
        TOO_LARGE,
    )
    assert status == 413 and b"too large" in answer
    _still_serving(base, proc)
    assert httpx.get(f"{base}/asset", timeout=10).status_code == 200
