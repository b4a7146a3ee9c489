"""What a newcomer meets first holds: every `procure` command and flag the README shows exists,
`.env.example` lists every setting with its default (the README says so), a `.env` copied from
it (the README's first step) works, and a few key commands print what the README says."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Iterator
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import AliasChoices, SecretStr
from pydantic_settings import BaseSettings

from cli_run import procure

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"
SRC = ROOT / "src"

# `.env.example` values that are knowingly not the code's default, each with the reason the
# README or `.env.example` itself gives. Anything else that differs is a lie to the reader.
NOT_DEFAULTS = {
    # The seeds' set-up, so that `cp .env.example .env` tells the demo's story (README,
    # Configuration): unset, no vendor fails.
    "FAIL_VENDOR_ID",
    "FAIL_RATE",
}


def settings_classes() -> Iterator[type[BaseSettings]]:
    """Every settings class procure defines, found in the source (a new one is found too)."""
    for path in sorted((SRC / "procure").rglob("*.py")):
        if "(BaseSettings)" not in path.read_text(encoding="utf-8"):
            continue
        module = import_module(".".join(path.relative_to(SRC).with_suffix("").parts))
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseSettings)
                and value.__module__ == module.__name__
            ):
                yield value


def env_names(cls: type[BaseSettings]) -> dict[str, str]:
    """Field name -> the environment variable a user sets for it (the first alias)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = {}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        first = alias.choices[0] if isinstance(alias, AliasChoices) else alias
        names[name] = str(first) if first else (prefix + name).upper()
    return names


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def test_env_example_lists_every_setting() -> None:
    """The README: "`.env.example`, which lists every variable". A setting added to the code
    but not there is one a user cannot find."""
    listed = env_example()
    missing = sorted(
        f"{env} ({cls.__module__}.{cls.__name__})"
        for cls in settings_classes()
        for env in env_names(cls).values()
        if env not in listed
    )
    assert not missing, f"settings missing from .env.example: {missing}"


def unset_if_blank(value: object) -> object:
    """`.env.example`'s `NAME=` means unset (its header says so): blank is None."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    return None if isinstance(text, str) and not text.strip() else value


def test_a_env_copied_from_the_example_is_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cp .env.example .env` (the README's first step) loads in every settings class and
    changes nothing but the seeds' failure injection: each value listed is the default (a
    variable read by several classes: the default those that give one agree on)."""
    listed = env_example()
    for name in listed:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    defaults: dict[str, set[str]] = {}
    loaded: dict[str, set[str]] = {}
    for cls in settings_classes():
        default = cls(_env_file=None).model_dump()  # type: ignore[call-arg]
        read = cls().model_dump()  # reads ./.env, as every command does
        for field, env in env_names(cls).items():
            if (value := unset_if_blank(default[field])) is not None:
                defaults.setdefault(env, set()).add(repr(value))
            loaded.setdefault(env, set()).add(repr(unset_if_blank(read[field])))
    differ = [
        f"{env}: .env.example {sorted(values)}, default {sorted(defaults.get(env, {'None'}))}"
        for env, values in sorted(loaded.items())
        if env not in NOT_DEFAULTS and values - defaults.get(env, {"None"})
    ]
    assert not differ, differ


# --- every command and flag the README shows exists ---------------------------------------------


def readme_commands() -> list[str]:
    """`procure ...` as the README shows it: inline code spans (a span may wrap a line) and the
    lines of its fenced blocks, without comments, `&` and the `.venv/bin/` prefix."""
    text = README.read_text(encoding="utf-8")
    found = []
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    for block in blocks:
        for line in block.splitlines():
            found.append(line.split(" #")[0].strip().rstrip("&").strip())
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    commands = []
    for command in found:
        command = command.removeprefix(".venv/bin/")
        if command.startswith("procure "):
            commands.append(command)
    return commands


def procure_cli() -> Any:
    """The command tree behind the `procure` console script (as pyproject names it). Typer
    builds it on its own copy of click: groups are told by their `commands`, not by type."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "procure"]
    return typer.main.get_command(script.load())


def check_command(root: Any, command: str) -> list[str]:
    """What of `command` the CLI does not have: a subcommand, or a flag of the command."""
    problems = []
    words = [w.strip("[]") for w in shlex.split(command.replace("...", ""))][1:]
    current = root
    path = ["procure"]
    for word in words:
        if hasattr(current, "commands") and not word.startswith("-"):
            names = word.split("|")  # `approve|reject|rollback`: each is a subcommand
            unknown = [n for n in names if n not in current.commands]
            if not unknown:
                current = current.commands[names[0]]
                path.append(names[0])
                continue
            if len(current.params) <= 1:  # a group of commands only: `word` must be one
                problems.append(f"{' '.join(path)} has no command {word!r}")
                break
        if word.startswith("--"):
            flag = word.split("=")[0]
            flags = {o for p in current.params for o in (*p.opts, *p.secondary_opts)}
            if flag not in flags:
                problems.append(f"{' '.join(path)} has no flag {flag}")
    return problems


def test_every_procure_command_the_readme_shows_exists() -> None:
    """A newcomer runs what the README shows: every subcommand and every `--flag` in a
    `procure ...` command there must be one the CLI has (its `--help` lists it)."""
    commands = readme_commands()
    assert len(commands) > 30, commands  # the README's commands were found at all
    root = procure_cli()
    problems = [f"`{c}`: {p}" for c in commands for p in check_command(root, c)]
    assert not problems, problems


def test_a_missing_flag_or_command_is_caught() -> None:
    """The check above finds what is wrong (else it would pass on anything)."""
    root = procure_cli()
    assert check_command(root, "procure fleet run --once --live") == []
    assert check_command(root, "procure fleet approve|reject|rollback ID") == []
    assert check_command(root, "procure fleet run --dry") == ["procure fleet run has no flag --dry"]
    assert check_command(root, "procure fleet nap") == ["procure fleet has no command 'nap'"]


# --- a few key commands print what the README says ----------------------------------------------


def test_tickets_winprob_gives_the_readme_figure(tmp_path: Path) -> None:
    """README: "`procure tickets winprob --ticket-ev 18gwei --face-value 180gwei` gives
    winProb 0.1"."""
    done = procure(
        tmp_path, "tickets", "winprob", "--ticket-ev", "18gwei", "--face-value", "180gwei"
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^winProb\s+0\.1\b", done.stdout, flags=re.M), done.stdout


def test_spend_runs_on_a_env_copied_from_the_example(tmp_path: Path) -> None:
    """`cp .env.example .env`, then a command: `procure spend --json` answers the totals the
    README names (none spent yet on a fresh store), not a settings error."""
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    done = procure(tmp_path, "spend", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    spend = json.loads(done.stdout)
    assert spend["total"] == 0 and set(spend["windows"]) == {"hour", "day", "month"}, spend
