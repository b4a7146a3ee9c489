"""A real Prometheus for the tests (Debian's `prometheus` package): find its binaries (a skip
outside CI, a failure under CI=true), run one on a free loopback port, query it, wait on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.local import free_port


def tool(name: str) -> str:
    """The path of `prometheus` or `promtool`. Skips only outside CI when it is missing; under
    CI=true it must run."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} must be installed under CI=true (Debian package prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return found


def promtool(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def eventually(
    condition: Callable[[], Any], what: str, within_s: float = 60, every_s: float = 0.2
) -> Any:
    """The condition's first truthy answer; an AssertionError naming `what` past the deadline."""
    deadline = time.monotonic() + within_s
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(every_s)
    return found


@dataclass(frozen=True)
class Prometheus:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **params: Any) -> Any:
        """The `data` of an API answer; None while Prometheus is not up or refuses the call."""
        try:
            answer = httpx.get(f"{self.url}{path}", params=params, timeout=5)
        except httpx.HTTPError:
            return None  # not up yet
        return answer.json()["data"] if answer.status_code == 200 else None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's series; [] while there are none (or Prometheus is not up)."""
        data = self.get("/api/v1/query", query=promql)
        return data["result"] if data else []


@contextmanager
def running_prometheus(config: Path, tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port with `config`, its database under `tmp_path`;
    stopped (and waited for) on the way out."""
    port = free_port()
    process = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield Prometheus(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
