"""What every `procure` command shares: the console, the settings and the store, and errors
as one line instead of a traceback."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from procure.numbers import whole

# The settings are imported where a command reads them (`load_settings`): pydantic-settings
# would cost `--help` and every refused option about as much CPU again as the help itself
if TYPE_CHECKING:
    from procure.settings import Settings

PORT = whole(1, 65535, "--port")

console = Console(emoji=False)  # ":name:" in a cloud's or vendor's text stays text


def store_for(settings: Settings):  # type: ignore[no-untyped-def]
    from procure.store import open_store

    return open_store(settings.database_url)


def table(key: str, *columns: str, fold: tuple[str, ...] = ()) -> Table:
    """A table that stays readable in 80 columns: the first column (the id the next command
    needs) is never cut nor wrapped, short columns (status, figures) neither; the long text
    columns named in `fold` take what is left and fold onto more lines instead of being cut."""
    out = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    out.add_column(key, no_wrap=True, min_width=len(key))
    for name in columns:
        if name in fold:
            out.add_column(name, overflow="fold", ratio=1, min_width=6)
        else:
            out.add_column(name, no_wrap=True, overflow="fold")
    return out


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: the CLI never shows a traceback for bad input.
    The message may quote outside text: escape sequences and line breaks are taken out."""
    from procure.safetext import clean

    typer.echo(f"error: {clean(message, 1000)}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings, or one line naming the variable that is wrong."""
    from procure.settings import get_settings

    with settings_errors():
        return get_settings()


@contextlib.contextmanager
def settings_errors() -> Iterator[None]:
    """Any settings class refused while this runs (start-up): one line naming each variable
    and why, never the value (it may be a secret), and exit status 1."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as exc:
        found = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            why = str(e["msg"]).removeprefix("Value error, ")
            found.append(f"{where}: {why}" if where else why)
        fail("bad setting: " + "; ".join(found))


@contextlib.contextmanager
def key_errors() -> Iterator[None]:
    """The deployment's key (PROCURE_SECRET_KEY or its file) refused while this runs: one line
    naming it. Apart from `settings_errors`, whose every command would import the cryptography
    it needs only where a keyring is made."""
    from procure.vendors.credentials import CredentialError

    try:
        yield
    except CredentialError as exc:
        fail(f"bad setting: {exc}")


def level_named(name: str) -> str:
    """A logging level by its name (any case), or one line saying which names there are."""
    import logging

    level = name.strip().upper()
    if level not in logging.getLevelNamesMapping():
        fail(f"--log-level: one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not {name[:40]!r}", 2)
    return level


def cloud_settings(**overrides: Any) -> Any:
    """Lambda Cloud's settings, with LAMBDA_API_URL checked to be an http(s) URL."""
    from procure.clouds.lambda_cloud.settings import LambdaSettings
    from procure.settings import http_url

    with settings_errors():
        cloud = LambdaSettings(**overrides)
    try:
        http_url(cloud.api_url)
    except ValueError as exc:
        fail(f"bad setting: LAMBDA_API_URL: {exc}")
    return cloud


@contextlib.contextmanager
def store_errors(settings: Settings) -> Iterator[None]:
    """A store that cannot be opened or answer becomes one line, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        scheme = settings.database_url.split(":", 1)[0]
        fail(f"the store ({scheme}) failed: {detail[0] if detail else type(exc).__name__}")


def listen_on(host: str, port: int) -> socket.socket:
    """A socket listening on `host:port` (SO_REUSEADDR, as uvicorn's: a port just freed is
    free), or one line saying why not. Taken before a server's side effects (funding a wallet,
    paying vendors, a banner saying where it serves), so that a busy port is said first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another with --port")


def check_port(host: str, port: int) -> None:
    """Fail in one line now if the server to start could not listen on `host:port`."""
    listen_on(host, port).close()
