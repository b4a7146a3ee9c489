"""Helpers for the dashboard's browser tests: Debian's Chromium driven by Playwright (never
`playwright install`), and the dashboard served on loopback over a test world's store."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import SecretStr

from procure.api.app import create_app
from procure.local import LocalServer, serve
from world import World

CHROMIUM = Path("/usr/bin/chromium")
QUIET = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T = TypeVar("T")


def need_chromium() -> None:
    """Skip without Chromium locally; under CI=true the browser tests must run, never skip."""
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is missing (pip install -e '.[dev]')"
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot skip under CI=true: {missing}")
    pytest.skip(missing)


@contextmanager
def chromium() -> Iterator[Any]:
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=QUIET)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def dashboard(world: World, token: str | None = None) -> Iterator[LocalServer]:
    """`procure serve` as the tests need it: the API and its dashboard, without a worker (the
    tests advance runs themselves), on loopback over the world's store."""
    settings = world.settings
    if token is not None:
        settings = settings.model_copy(update={"api_token": SecretStr(token)})
    server = serve(create_app(settings, world.store))
    try:
        yield server
    finally:
        server.stop()


def console_errors(page: Any) -> list[str]:
    """Collect the page's script errors and console errors from now on (a 4xx the test asks
    for, e.g. a wrong token, is expected and left out); assert the list empty after each page."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda m: (
            m.type == "error"
            and not re.search(r"Failed to load resource.*status of 4\d\d", m.text)
            and errors.append(f"console: {m.text}")
        ),
    )
    return errors


def off_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in another thread: Playwright's sync API owns this thread's event loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=90)


def drive_run(world: World, run_id: str) -> None:
    from world import drive

    off_thread(lambda: asyncio.run(drive(world.deps(), run_id)))


def screenshot_dir(tmp: Path) -> Path:
    """Where screenshots go: WEB_SCREENSHOTS if set (CI artifacts), else the test's tmp dir."""
    where = Path(os.environ.get("WEB_SCREENSHOTS") or tmp)
    where.mkdir(parents=True, exist_ok=True)
    return where


class Loop:
    """An event loop on its own thread: the controller runs there while Playwright's sync API
    owns the test's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=90)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
