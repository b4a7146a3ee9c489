"""Numbers from the environment and the command line: every cap, threshold, duration and price
setting refuses nan, inf, -1, 1e400 and expressions at start-up naming the setting; malformed
URL settings are refused naming the setting; every numeric CLI option refuses bad values with one
line and exit status 2 (a property test over all of them), and a huge exponent is never
evaluated; an empty PROCURE_API_TOKEN (as in .env.example) means no token."""

from __future__ import annotations

import math
import types
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from procure.cli import app
from procure.fleet.settings import FleetSettings
from procure.gpu.settings import GpuWorkerSettings
from procure.numbers import Number
from procure.settings import Settings
from procure.web.settings import WebSettings

CLASSES: list[type[BaseModel]] = [Settings, FleetSettings, GpuWorkerSettings, WebSettings]
BAD = ["nan", "NaN", "inf", "-inf", "-1", "1e400", "10**10**10", "1" + "0" * 400]
NUMERIC = (int, float, int | None, float | None)
SPECIAL = ("nan", "inf", "infinity")
REPO = Path(__file__).resolve().parents[1]


def numeric_settings() -> list[tuple[type[BaseModel], str]]:
    found = []
    for cls in CLASSES:
        for name, info in cls.model_fields.items():
            if info.annotation in NUMERIC:
                alias = info.validation_alias
                assert isinstance(alias, str), (cls.__name__, name)
                found.append((cls, alias))
    return found


@pytest.fixture(autouse=True)
def no_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env: each test says what it sets


@pytest.mark.parametrize(
    ("cls", "alias"),
    numeric_settings(),
    ids=[f"{c.__name__}.{a}" for c, a in numeric_settings()],
)
def test_every_number_setting_refuses_non_finite_negative_and_huge(
    cls: type[BaseModel], alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad in BAD:
        monkeypatch.setenv(alias, bad)
        with pytest.raises(ValidationError) as refused:
            cls()
        named = [e for e in refused.value.errors() if alias in map(str, e["loc"])]
        assert named, (alias, bad, refused.value.errors())
    monkeypatch.setenv(alias, "1e308")  # finite but absurd: out of every range
    with pytest.raises(ValidationError):
        cls()


def test_a_nan_threshold_cannot_skip_approval() -> None:
    # The rail compares `cost > threshold`: with nan that is always false (no approval ever).
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValidationError, match="LAMBDA_LABS_CONFIRMATION_THRESHOLD"):
            FleetSettings(LAMBDA_LABS_CONFIRMATION_THRESHOLD=bad)


@pytest.mark.parametrize(
    ("cls", "alias"),
    [
        (FleetSettings, "SLACK_WEBHOOK_URL"),
        (FleetSettings, "FLEET_PROMETHEUS_URL"),
        (GpuWorkerSettings, "ORCHESTRATOR_URL"),
        (GpuWorkerSettings, "OLLAMA_URL"),
        (GpuWorkerSettings, "CAPABILITY_URL"),
        (Settings, "X402_FACILITATOR_URL"),
        (Settings, "LLM_BASE_URL"),
    ],
)
def test_malformed_url_settings_are_refused_naming_them(
    cls: type[BaseModel], alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for bad in ("hooks.slack.com/x", "ftp://h/x", "http://", "http://h:99999/", "http://h x/"):
        monkeypatch.setenv(alias, bad)
        with pytest.raises(ValidationError) as refused:
            cls()
        assert [e for e in refused.value.errors() if alias in map(str, e["loc"])]
        assert bad not in str(refused.value)  # never echoed: it may be a secret


def test_cli_start_up_names_the_bad_setting_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("LAMBDA_LABS_CONFIRMATION_THRESHOLD", "nan")
    answer = runner.invoke(app, ["fleet", "status"])
    assert answer.exit_code == 1
    assert "LAMBDA_LABS_CONFIRMATION_THRESHOLD" in answer.output
    assert "Traceback" not in answer.output
    monkeypatch.delenv("LAMBDA_LABS_CONFIRMATION_THRESHOLD")
    monkeypatch.setenv("LAMBDA_API_URL", "cloud.lambda.ai")
    answer = runner.invoke(app, ["fleet", "run", "--once"])
    assert answer.exit_code == 1
    assert "LAMBDA_API_URL" in answer.output and "Traceback" not in answer.output


def test_env_example_loads_and_its_empty_token_means_no_token(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text())
    settings_ = Settings()
    assert settings_.api_token is None  # `PROCURE_API_TOKEN=` must not lock the API
    for cls in CLASSES[1:]:
        cls()  # every other settings class accepts the example as it stands


# --- the command line ------------------------------------------------------------------------


def numeric_options() -> list[tuple[str, str, Any]]:
    """(command, option, parser) for every int/float option of every `procure` command."""
    found = []

    def walk(command: Any, path: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for param in getattr(command, "params", []):
            descriptor = getattr(param, "type_descriptor", None)
            if descriptor is None or descriptor.annotation not in NUMERIC:
                continue
            found.append((path, param.opts[0], descriptor.parameter_info.parser))

    walk(typer.main.get_command(app), "")
    return found


def test_every_numeric_option_is_checked() -> None:
    options = numeric_options()
    assert len(options) >= 25
    unchecked = [(c, o) for c, o, parser in options if not isinstance(parser, Number)]
    assert unchecked == []


NUMBERISH = st.one_of(
    st.sampled_from([*BAD, "", " ", "1e-400", "0x10", "1_000", "١٢", "1e99999999999", "+5", ".5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(alphabet="0123456789.eE+-_xna*i ", max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(min_value=0, max_value=10_000), text=NUMBERISH)
def test_numeric_options_accept_only_finite_values_in_range(index: int, text: str) -> None:
    options = numeric_options_cached()
    _command, flag, parser = options[index % len(options)]
    try:
        value = parser(text)
    except typer.Exit as exc:
        assert exc.exit_code == 2
        return
    assert isinstance(value, int | float) and not isinstance(value, bool)
    if parser.later:  # `run start`: its own check (the API's limits) judges the value
        assert math.isfinite(value) or text.strip().lower().lstrip("+-") in SPECIAL
        return
    assert math.isfinite(value) and parser.lo <= value <= parser.hi, (flag, text, value)
    if parser.integer:
        assert isinstance(value, int)


_CACHE = types.SimpleNamespace(options=None)


def numeric_options_cached() -> list[tuple[str, str, Any]]:
    if _CACHE.options is None:
        _CACHE.options = numeric_options()
    return _CACHE.options


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "start", "--goal", "x", "--budget", "nan"],
        ["run", "start", "--goal", "x", "--budget", "1e400"],
        ["run", "list", "--limit", "10**10**10"],
        ["fleet", "actions", "--limit", "0"],
        ["fleet", "run", "--once", "--interval", "inf"],
        ["worker", "--poll-interval", "-1"],
        ["serve", "--port", "99999"],
        ["mock-cloud", "--speed", "nan"],
        ["tickets", "wins", "--signature", "00", "--recipient-rand", "1", "--win-prob", "inf"],
        ["tickets", "winprob", "--ticket-ev", "1e999999999", "--face-value", "10"],
        ["tickets", "check", "--max-face-value", "1e9999999999999"],
    ],
)
def test_bad_numbers_are_one_line_and_exit_2(argv: list[str]) -> None:
    answer = CliRunner().invoke(app, argv)
    assert answer.exit_code == 2, answer.output
    lines = [line for line in answer.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), answer.output
