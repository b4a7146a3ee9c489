"""JSON bytes in UTF-16 or UTF-32 are bounded as UTF-8 ones are. Python's `json.loads` (and so
every FastAPI route, and `bounds.loads`) detects those encodings by the first bytes and reads
them; the bounds, which scanned the raw bytes as if they were UTF-8, saw a character whose
UTF-16 code unit holds a quote's byte (U+0122 "Ģ" is 0x22 0x01) as a string opening, and the
`[` after it as text. A real `procure serve` process is sent such a body, 100,000 levels deep.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from procure.bounds import UnsafeInput, check_json, json_depth, loads
from procure.local import free_port
from test_bounds_inbound import _post, _start, _still_serving, _stop

ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
# A string holding U+0122, then arrays nested past any parser's recursion.
HIDDEN_DEEP = '["\u0122",' + "[" * 100_000


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_number_past_a_floats_range_is_refused_in_utf16_and_utf32(encoding: str) -> None:
    """Before the fix: `loads` screened the raw bytes for a long exponent, found none (each
    digit is followed by a zero byte in UTF-16), and answered [inf] and {'price': inf}."""
    for text in ("[1e400]", '{"price": -1E+400}', "[1.0e00000000000000000400]"):
        with pytest.raises(UnsafeInput, match="a number past a float's range"):
            loads(text.encode(encoding))
    assert loads('{"price": 1.5e300, "note": "Ģ"}'.encode(encoding)) == {
        "price": 1.5e300,
        "note": "Ģ",
    }


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_depth_of_utf16_and_utf32_json_is_measured(encoding: str) -> None:
    """Before the fix: `json_depth` read '["Ģ",[[[…' in UTF-16-LE as nested 1 level deep (the
    quote's byte in "Ģ" opened a string that ran to the end), so `check_json` and `loads` let
    100,000 levels through to the parser."""
    raw = ('["\u0122",' + "[" * 100 + "]" * 101).encode(encoding)
    assert json_depth(raw) == 101
    with pytest.raises(UnsafeInput, match="nested 101 levels deep"):
        check_json(raw)
    with pytest.raises(UnsafeInput, match="nested 100,001 levels deep"):
        loads(HIDDEN_DEEP.encode(encoding))


def test_bytes_json_cannot_decode_are_bounded_without_error() -> None:
    # Odd-length UTF-16 is no text: the parser cannot read it either, so any finite figure does.
    raw = b"[\x00[\x00[\x00"[:-1]
    assert json_depth(raw) >= 0
    with pytest.raises(UnsafeInput):
        loads(raw)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    """`procure serve --no-worker` on SQLite, as a real process (its EVM libraries raise the
    recursion limit to 100,000: a parser that recurses that deep overflows the C stack)."""
    tmp: Path = tmp_path_factory.mktemp("serve-utf16")
    port = free_port()
    env = {
        "PROCURE_DATABASE_URL": f"sqlite:///{tmp / 'procure.db'}",
        "PROCURE_HOME": str(tmp / "home"),
        "PROCURE_API_TOKEN": "s3cret",
    }
    proc = _start(["serve", "--no-worker"], env, port, tmp / "serve.log")
    yield f"http://127.0.0.1:{port}", proc
    _stop(proc)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-32"])
def test_deep_utf16_json_to_the_api_is_a_400_and_the_server_lives(
    server: tuple[str, subprocess.Popen], encoding: str
) -> None:
    """Before the fix: the inbound bound measured the body 1 level deep and let it through,
    unauthenticated; FastAPI's parser recursed 100,000 levels and the server died of a
    segmentation fault (exit -11), taking every run's API with it."""
    base, proc = server
    answer = _post(f"{base}/api/agent-start", HIDDEN_DEEP.encode(encoding))
    assert answer.status_code == 400, answer.text
    assert "nested deeper" in answer.json()["error"]
    _still_serving(base, proc)
