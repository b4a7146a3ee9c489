"""Text from outside printed safely: a property test that `safe` leaves no escape sequence,
control or bidi character, and that Rich prints it literally (no markup, no link); and the
fleet's and vendors' tables in the CLI print hostile instance and vendor names as plain text."""

from __future__ import annotations

import io
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from procure.cli import app
from procure.safetext import clean, redact, safe
from procure.store import fleet_repo, open_store

HOSTILE = [
    "[bold red]pwned[/]",
    "[link=https://evil.example]click[/link]",
    "\x1b]8;;https://evil.example\x07click\x1b]8;;\x07",
    "\x1b[2J\x1b[31mred\x1b[0m",
    "\x9b31mC1 CSI",
    "a\u202eevil\u202c",
    "line\nbreak\rreturn",
    "\x1b",
    "[/]",
    "\\[escaped]",
    "\x00\x07\x7f",
]
FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
TEXT = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=200),
    st.lists(st.sampled_from([*HOSTILE, "x", "[", "]", "/", "\\", "\x1b", "]8;;"])).map("".join),
)


def printed(markup: str) -> str:
    out = io.StringIO()
    Console(file=out, width=10_000, emoji=False, highlight=False, color_system=None).print(
        markup, soft_wrap=True
    )
    return out.getvalue().removesuffix("\n")


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_safe_text_has_no_controls_and_prints_literally(text: str) -> None:
    cleaned = clean(text)
    assert not FORBIDDEN.search(cleaned)
    assert "\x1b" not in cleaned and "\n" not in cleaned
    shown = printed(safe(text))  # Rich shows exactly the text: no markup applied, except that
    # Rich doubles a trailing backslash, so that it cannot escape a tag written after it
    assert shown == cleaned or (cleaned.endswith("\\") and shown == cleaned + "\\")
    assert clean(cleaned) == cleaned  # idempotent


@given(st.text(max_size=100))
def test_redact_keeps_ordinary_text(text: str) -> None:
    lowered = text.lower()
    if not any(k in lowered for k in ("://", "bearer", "basic", "hooks.slack", "=")):
        assert redact(text) == text


def test_cli_tables_print_hostile_names_as_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_url = f"sqlite:///{tmp_path / 'procure.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROCURE_DATABASE_URL", db_url)
    from procure.settings import get_settings

    get_settings.cache_clear()
    store = open_store(db_url)
    from procure.models import utcnow

    now = utcnow()
    with store.session() as s:
        fleet_repo.upsert_instance(
            s,
            now,
            instance_id="i-\x1b]8;;https://evil.example\x07x\x1b]8;;\x07",
            name="[bold]n[/]",
            instance_type="[link=https://evil.example]gpu[/link]\x1b[2J",
            region="r",
            ip=None,
            status="active",
            price_per_hour=1,
            gpus=1,
            launched_by=None,
        )
        fleet_repo.add_action(
            s,
            action_id="provision_1",
            action_type="provision_instance",
            target_instance=None,
            reason="[red]boom[/] \x1b[31mred",
            cost_impact=Decimal("1"),
            status="blocked",
            created_at=now,
            dry_run=True,
        )
    store.dispose()
    try:
        for argv in (["fleet", "status"], ["fleet", "actions"]):
            answer = CliRunner().invoke(app, argv, env={"COLUMNS": "400"})
            assert answer.exit_code == 0, answer.output
            assert "\x1b" not in answer.output
        status = CliRunner().invoke(app, ["fleet", "status"], env={"COLUMNS": "400"}).output
        assert "[link=https://evil.example]gpu[/link]" in status  # shown, not obeyed
        actions = CliRunner().invoke(app, ["fleet", "actions"], env={"COLUMNS": "400"}).output
        assert "[red]boom[/] red" in actions
    finally:
        get_settings.cache_clear()
