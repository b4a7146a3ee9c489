"""`bounds.loads` refuses a number past a float's range (1e999), as it refuses NaN and Infinity:
Python's JSON reads one as infinity without asking `parse_constant`, so a route built on `loads`
alone would have taken an infinite price or amount. Every finite number still reads as before,
and a number's text inside a string is only text."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procure.bounds import UnsafeInput, loads

PAST = [
    b"1e999",
    b"-1e999",
    b"1E+309",
    b"1.5e0400",
    b"[0.5, 2, 1e400]",
    b'{"price": {"usd": 1e309}}',
    b"9" * 400 + b".5",
    b"9" * 210 + b"e99",
]


@pytest.mark.parametrize("raw", PAST)
def test_a_number_past_a_floats_range_is_refused(raw: bytes) -> None:
    """Before the fix: `loads` answered these with float infinity (or a structure holding it)."""
    with pytest.raises(UnsafeInput, match="a number past a float's range"):
        loads(raw)
    with pytest.raises(UnsafeInput, match="a number past a float's range"):
        loads(raw.decode())  # text as well as bytes


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"1e308", 1e308),
        (b"1.7976931348623157e308", 1.7976931348623157e308),
        (b"-1.7976931348623157E+308", -1.7976931348623157e308),
        (b"1e-999", 0.0),
        (b"9" * 209 + b"e99", float("9" * 209 + "e99")),
        (b"1" * 400 + b"e-200", float("1" * 400 + "e-200")),
        (b'{"note": "1e999 e+000 ' + b"9" * 300 + b'", "n": 0.25}', None),
        (b"[1, 2.5, 3e5]", [1, 2.5, 300000.0]),
    ],
)
def test_every_finite_number_reads_as_before(raw: bytes, value: object) -> None:
    got = loads(raw)
    assert got == (json.loads(raw) if value is None else value)


# JSON numbers: an integer part (no leading zeros), an optional fraction and exponent.
_INT = st.one_of(
    st.just("0"),
    st.builds(
        lambda first, rest: first + rest,
        st.sampled_from("123456789"),
        st.text("0123456789", max_size=320),
    ),
)
_NUMBER = st.builds(
    lambda sign, whole, frac, exp: sign + whole + frac + exp,
    st.sampled_from(["", "-"]),
    _INT,
    st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=30).map(lambda f: "." + f)),
    st.one_of(
        st.just(""),
        st.builds(
            lambda e, sign, digits: e + sign + digits,
            st.sampled_from("eE"),
            st.sampled_from(["", "+", "-"]),
            st.text("0123456789", min_size=1, max_size=5),
        ),
    ),
)


@settings(max_examples=400, deadline=None)
@given(_NUMBER)
def test_a_number_is_refused_exactly_when_no_float_can_hold_it(text: str) -> None:
    """However a number is written, `loads` refuses it if and only if Python reads it as an
    infinite float."""
    body = f'{{"x": [{text}]}}'
    expected = json.loads(body)["x"][0]
    if isinstance(expected, float) and math.isinf(expected):
        with pytest.raises(UnsafeInput, match="a number past a float's range"):
            loads(body)
    else:
        assert loads(body) == {"x": [expected]}
