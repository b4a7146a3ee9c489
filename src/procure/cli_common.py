"""What every `procure` command shares: the console, the settings and the store, and errors
as one line instead of a traceback."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console

from procure.settings import Settings, get_settings

console = Console()


def store_for(settings: Settings):  # type: ignore[no-untyped-def]
    from procure.store import open_store

    return open_store(settings.database_url)


def print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit: the CLI never shows a traceback for bad input."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """The settings, or one line naming the variable that is wrong."""
    from pydantic import ValidationError

    try:
        return get_settings()
    except ValidationError as exc:
        found = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        fail("bad setting: " + "; ".join(found))


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
