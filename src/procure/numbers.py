"""Finite, bounded numbers from outside (settings, CLI options): text is checked by its shape
and length before it is converted, so `nan`, `inf`, `1e400` or `10**10**10` are refused and a
huge exponent is never evaluated; a value out of its range is refused with the setting's name."""

from __future__ import annotations

import math
import re
from typing import Any

import typer

# A plain decimal: digits, an optional fraction and a small exponent. Nothing else (no `nan`,
# `inf`, `0x`, `_`, `**`) gets as far as float() or int().
_DECIMAL = re.compile(r"[+-]?(?:\d{1,40}(?:\.\d{0,40})?|\.\d{1,40})(?:[eE][+-]?\d{1,3})?")
_INTEGER = re.compile(r"[+-]?\d{1,40}")
_SPECIAL = re.compile(r"(?i)[+-]?(?:nan|inf|infinity)")
MAX_TEXT = 100


class NumberError(ValueError):
    """A number that is not acceptable: the message says why, for people."""


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def parse_number(text: str, *, lo: float, hi: float, integer: bool = False) -> float | int:
    """`text` as a finite number in [lo, hi] (an int when `integer`), or NumberError."""
    raw = text.strip()
    kind = "a whole number" if integer else "a number"
    if len(raw) > MAX_TEXT or not (_INTEGER if integer else _DECIMAL).fullmatch(raw):
        raise NumberError(f"{_shown(text)} is not {kind}")
    value: float | int = int(raw) if integer else float(raw)
    if isinstance(value, float) and not math.isfinite(value):
        raise NumberError(f"{_shown(text)} is too large")
    return check_range(value, lo=lo, hi=hi)


def check_range(value: float | int, *, lo: float, hi: float) -> float | int:
    """`value` when it is finite and within [lo, hi], else NumberError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NumberError(f"{value!r} is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise NumberError(f"{value} is not a finite number")
    if not lo <= value <= hi:
        raise NumberError(f"{value:g} is out of range ({lo:g} to {hi:g})")
    return value


def finite_before(value: Any) -> Any:
    """A pydantic `mode="before"` check for a number setting: text that is not a plain decimal
    (nan, inf, 1e400, an expression) and non-finite floats are refused before conversion."""
    if isinstance(value, str):
        raw = value.strip()
        if len(raw) > MAX_TEXT or not _DECIMAL.fullmatch(raw):
            raise ValueError(f"{_shown(value)} is not a number")
        if not math.isfinite(float(raw)):
            raise ValueError(f"{_shown(value)} is too large")
        return raw
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    return value


class Number:
    """A CLI option's parser (`typer.Option(parser=number(0, 1e6, "--budget"))`): a finite
    number in [lo, hi]. A bad value is one line on stderr and exit status 2, never a
    traceback or a usage panel."""

    def __init__(
        self, lo: float, hi: float, flag: str, *, integer: bool = False, later: bool = False
    ) -> None:
        self.lo, self.hi, self.flag, self.integer = lo, hi, flag, integer
        self.later = later  # only the text's shape here: the command checks the value itself
        self.__name__ = "INTEGER" if integer else "NUMBER"  # the metavar Typer shows

    def __call__(self, value: Any) -> float | int:
        if isinstance(value, int | float) and not isinstance(value, bool):
            text = repr(value)
        else:
            text = str(value)
        try:
            if self.later and _SPECIAL.fullmatch(text.strip()):
                return float(text)  # nan, inf: the command's own check names the limit
            if self.later:
                return parse_number(text, lo=-math.inf, hi=math.inf, integer=self.integer)
            return parse_number(text, lo=self.lo, hi=self.hi, integer=self.integer)
        except NumberError as exc:
            typer.echo(f"error: {self.flag}: {exc}", err=True)
            raise typer.Exit(2) from None


def number(lo: float, hi: float, flag: str) -> Number:
    return Number(lo, hi, flag)


def whole(lo: int, hi: int, flag: str) -> Number:
    return Number(lo, hi, flag, integer=True)


def shaped(flag: str, *, integer: bool = False) -> Number:
    """A parser that refuses only text that is no number (an expression, garbage, a huge
    exponent): for options whose command checks the value itself with its own messages."""
    return Number(-math.inf, math.inf, flag, integer=integer, later=True)


UINT256_MAX = 2**256 - 1
_EXPONENT = re.compile(r"[eE]\s*[+-]?\s*(\d+)")


def small_exponent(text: str, *, most: int = 80) -> str:
    """`text` unchanged when it is short and any exponent in it is at most `most`: checked on
    the text, so `1e999999999` is refused before an exact parser (Fraction) computes 10**n."""
    if len(text) > MAX_TEXT:
        raise NumberError(f"{_shown(text)} is too long")
    for found in _EXPONENT.finditer(text):
        digits = found.group(1).lstrip("0")
        if len(digits) > 3 or int(digits or "0") > most:
            raise NumberError(f"{_shown(text)} is too large")
    return text
