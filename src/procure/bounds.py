"""Bounds on everything that comes from outside: JSON depth and size, text length.

Python's JSON parser guards its depth with the interpreter's recursion limit, and the EVM
libraries we import (py-evm, py_ecc) raise that limit to 100,000, so a body of 100,000 `[`
overflows the C stack and kills the process. Every JSON the project parses from outside goes
through `loads` (or `check_json`), which measures the nesting without recursion first.
Imports nothing of the project.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

MAX_JSON_DEPTH = 64
"""Deeper than any document of ours or of the protocols we speak (x402 nests ~6 levels)."""
MAX_REQUEST_BYTES = 1 << 20
"""A request body to any of our services (1 MiB): 413 above it."""
MAX_ANSWER_BYTES = 2 << 20
"""An answer from a vendor, the facilitator, an LLM, a cloud or a node (2 MiB)."""
MAX_TEXT_CHARS = 4_000
"""One stored text from outside (a log line, an error, an observation)."""


class UnsafeInput(ValueError):
    """Input from outside that is too large, too deep or not JSON at all."""


# A string, or an unclosed one to the end of the input (possessive: without it an unclosed
# string of escaped quotes is tried again from each quote, quadratic in the input's size).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def as_utf8(raw: bytes | str) -> bytes:
    """`raw` as the UTF-8 bytes `json.loads` reads: it also reads bytes in UTF-16 or UTF-32
    (detected by their first bytes), where a byte that looks like a quote, a bracket or a
    digit need not be one (U+0122 is the bytes 0x22 0x01), so those are measured re-encoded.
    Bytes it cannot decode come back as they are: it reads nothing of them either."""
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogatepass")
    data = bytes(raw)
    encoding = json.detect_encoding(data)
    if encoding.startswith("utf-8"):
        return data
    try:
        return data.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    except UnicodeError:
        return data


def json_depth(raw: bytes | str) -> int:
    """How deep the arrays and objects of `raw` nest (brackets inside strings do not count).
    Linear and without recursion, so it is safe on any input; on text that is not JSON the
    figure is meaningless but finite."""
    return _depth(as_utf8(raw))


def _depth(data: bytes) -> int:
    if data.count(b"[") + data.count(b"{") <= 1:
        return data.count(b"[") + data.count(b"{")
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def check_json(
    raw: bytes | str, *, max_bytes: int = MAX_ANSWER_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> None:
    """Raise `UnsafeInput` if `raw` is larger than `max_bytes` or nests deeper than
    `max_depth`."""
    _checked(raw, max_bytes, max_depth)


def _checked(raw: bytes | str, max_bytes: int, max_depth: int) -> bytes:
    """`raw` as UTF-8 (`as_utf8`), once its size (bytes as given, before any decoding; text in
    UTF-8) and its depth are within bounds; else `UnsafeInput`."""
    text = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else None
    size = len(raw) if text is None else len(text)
    if size > max_bytes:
        raise UnsafeInput(f"{size:,} bytes, more than the {max_bytes:,} allowed")
    data = as_utf8(raw) if text is None else text
    depth = _depth(data)
    if depth > max_depth:
        raise UnsafeInput(f"JSON nested {depth:,} levels deep, more than the {max_depth} allowed")
    return data


def loads(
    raw: bytes | str, *, max_bytes: int = MAX_ANSWER_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> Any:
    """`json.loads` for input from outside: bounded size and depth, and no NaN or Infinity,
    written so or as a number past a float's range such as 1e999 (they are not JSON, and money
    must be finite), in any encoding it reads. Raises `UnsafeInput`."""
    data = _checked(raw, max_bytes, max_depth)
    floats = _finite if _may_overflow(data) else float
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=floats)
    except UnsafeInput:
        raise
    except (ValueError, RecursionError) as exc:
        raise UnsafeInput(f"not JSON: {exc}") from exc


def _no_constant(name: str) -> Any:
    raise UnsafeInput(f"not JSON: {name}")


# Digits read as 0 and an exponent's letter as e; its plus sign is dropped; anything else reads
# as a space.
_NUMERALS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x65 if c in b"eE" else 0x20 for c in range(256))
_BIG_EXPONENT = b"e000"
_LONG_RUN = b"0" * 210


def _may_overflow(data: bytes) -> bool:
    """Whether `data` (UTF-8) may hold a number past a float's range: one needs an exponent of
    three digits or more, or else (an exponent of two adds at most 99) 210 digits before its point.
    Checked for anywhere, strings too: a false alarm only costs checking each float as it is
    read, which slows a body of numbers by a fifth or more; this look costs a few percent."""
    seen = data.translate(_NUMERALS, b"+")
    # (A body without any e, most bodies of numbers, skips the slower of the two looks.)
    return (b"e" in seen and _BIG_EXPONENT in seen) or _LONG_RUN in seen


def _finite(text: str) -> float:
    # json reads a number past a float's range as infinity without asking `parse_constant`.
    value = float(text)
    if math.isinf(value):
        raise UnsafeInput("not JSON: a number past a float's range")  # never quoted
    return value


def clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut, with any NUL character
    replaced (PostgreSQL cannot store one in text)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if len(text) <= limit:
        return text
    keep = max(0, limit - 40)  # room for the note
    return f"{text[:keep]} … [{len(text) - keep:,} characters cut]"
