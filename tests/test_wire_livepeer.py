"""Livepeer tickets against go-livepeer's pm package: winProb equals the recipient's (vectors from
go-livepeer's own tests, and a line-by-line port of its formula, over thousands of pairs), and
the flag check means what go-livepeer's gateway does when it validates ticket params."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from procure.cli import app
from procure.gpu import tickets

MAX_UINT256 = 2**256 - 1
runner = CliRunner()

# go-livepeer pm/recipient_test.go, TestTicketParams (cfg.EV = 5): faceValue -> winProb.
GO_VECTORS = [
    (5, 100000000, 5789604461865809771178549250434395392663499233282028201972879200395660),
    (5, 777000000, 745122839364969082519761808292714979750772102095499125093034646125570),
    (5, 10001, 57890255593098787833002192285115442382396752657554526567072084795477017120),
    (5, 0, 0),  # price 0: faceValue 0, winProb 0
]


def go_int64(x: int) -> int:
    """Go's big.Int.Int64(): the low 64 bits of |x| as an int64, negated for a negative x."""
    low = abs(x) & (2**64 - 1)
    value = low - 2**64 if low >= 2**63 else low
    return -value if x < 0 else value


def go_win_prob(face_value: int, ev: int) -> int:
    """pm/recipient.go `winProb` (and recipient_test.go `calcWinProb`), line by line."""
    # Return 0 if faceValue happens to be 0
    if face_value == 0:
        return 0
    # Return maxWinProb if faceValue = EV
    if face_value == ev:
        return MAX_UINT256
    x, m = divmod(MAX_UINT256, face_value)  # new(big.Int).DivMod(maxWinProb, faceValue, m)
    if go_int64(m) != 0:
        return ev * (x + 1)
    # Compute winProb as the numerator of a fraction over maxWinProb
    return ev * x


def go_validate(
    face_value: int,
    win_prob: int,
    max_ev: Fraction,
    max_total_ev: Fraction,
    deposit: int,
    deposit_multiplier: int,
    num_tickets: int = 1,
) -> str | None:
    """pm/sender.go `validateTicketParams`'s checks on the ticket's money (None: accepted)."""
    ev = Fraction(face_value * win_prob, MAX_UINT256)  # ticketEV(faceValue, winProb)
    if ev <= 0:
        return None
    if ev >= face_value:
        return f"ticket faceValue too low faceValue={face_value}"
    if ev > max_ev:
        return "ticket EV > max ticket EV"
    if ev * num_tickets > max_total_ev:
        return "total ticket EV > max total ticket EV"
    if face_value > deposit // deposit_multiplier:
        return "ticket faceValue > max faceValue"
    return None


@pytest.mark.parametrize(("ev", "face", "expected"), GO_VECTORS)
def test_win_prob_matches_go_livepeers_own_vectors(ev: int, face: int, expected: int) -> None:
    assert tickets.win_prob(ev, face) == expected
    assert go_win_prob(face, ev) == expected  # the port agrees with go-livepeer too


def test_win_prob_is_max_when_the_face_value_is_the_ev() -> None:
    # recipient_test: faceValue = EV x evMultiplier (100) and faceValue = EV.
    assert tickets.win_prob(5, 500) == go_win_prob(500, 5) == 5 * (MAX_UINT256 // 500 + 1)
    assert tickets.win_prob(5, 5) == MAX_UINT256


def test_thousands_of_pairs_equal_the_port_where_rounding_down_did_not() -> None:
    pairs = [(ev, face) for face in range(1, 181) for ev in range(0, face + 1, 3)]
    pairs += [(ev * 10**9, face * 10**9) for face in (7, 9, 180, 333) for ev in range(1, face)]
    assert len(pairs) > 5000
    assert all(tickets.win_prob(ev, face) == go_win_prob(face, ev) for ev, face in pairs)
    # What procure computed before (ticketEV x MaxUint256 // faceValue) misses most of them.
    old = sum(ev * MAX_UINT256 // face != go_win_prob(face, ev) for ev, face in pairs)
    assert old > 1000


@given(st.integers(1, 2**200), st.data())
def test_win_prob_equals_the_port_for_any_pair(face: int, data: st.DataObject) -> None:
    ev = data.draw(st.integers(0, face))
    assert tickets.win_prob(ev, face) == go_win_prob(face, ev)


def test_a_remainder_whose_low_64_bits_are_zero_rounds_down_as_in_go() -> None:
    face = MAX_UINT256 - 2**64  # MaxUint256 = 1 x face + 2^64: go's m.Int64() is 0
    assert divmod(MAX_UINT256, face) == (1, 2**64)
    assert tickets.win_prob(3, face) == go_win_prob(face, 3) == 3


def test_a_win_prob_no_uint256_can_hold_is_refused_not_wrapped() -> None:
    face = 2**255 + 1
    assert go_win_prob(face, face - 1) > MAX_UINT256
    with pytest.raises(ValueError, match="256 bits"):
        tickets.win_prob(face - 1, face)


def _ticket_rows(checks: list[tickets.Check]) -> bool:
    return all(c.ok for c in checks if "PricePerUnit" not in c.parameter)


@settings(max_examples=300, deadline=None)
@given(
    face=st.integers(1, 10**19),
    data=st.data(),
    deposit=st.integers(0, 10**20),
    multiplier=st.integers(1, 5),
)
def test_the_flag_check_agrees_with_go_livepeers_gateway(
    face: int, data: st.DataObject, deposit: int, multiplier: int
) -> None:
    ev = data.draw(st.integers(1, face))
    fixed = go_win_prob(face, ev)
    actual = Fraction(face * fixed, MAX_UINT256)
    near = st.sampled_from([ev - 1, ev, ev + 1, int(actual), int(actual) + 1, 10**15])
    max_ev, max_total = data.draw(near), data.draw(near)
    checks = tickets.consistency(
        price_per_unit=1,
        ticket_ev=ev,
        face_value=face,
        max_price_per_unit=0,
        max_ticket_ev=max_ev,
        max_face_value=0,
        max_total_ev=max_total,
        deposit=deposit,
        deposit_multiplier=multiplier,
    )
    refusal = go_validate(face, fixed, Fraction(max_ev), Fraction(max_total), deposit, multiplier)
    assert _ticket_rows(checks) == (refusal is None), refusal


def test_a_ticket_ev_equal_to_the_ceiling_is_refused_once_win_prob_rounds_up() -> None:
    # 1e15 does not divide MaxUint256: the ticket's EV is a hair above 3e14.
    result = runner.invoke(
        app,
        [
            "tickets",
            "check",
            "--ticket-ev",
            "300000000000000",
            "--max-ticket-ev",
            "300000000000000",
            "--max-total-ev",
            "1000000000000000",
        ],
    )
    assert result.exit_code == 1
    (row,) = [line for line in result.stdout.splitlines() if "`maxTicketEV`" in line]
    assert row.endswith("❌ over the limit |")
    refusal = go_validate(
        10**15, go_win_prob(10**15, 3 * 10**14), Fraction(3 * 10**14), Fraction(10**15), 10**15, 1
    )
    assert refusal == "ticket EV > max ticket EV"


def test_ev_equal_to_face_value_and_gateway_flags_of_zero_mean_what_go_livepeer_says() -> None:
    def rows(**kw: int) -> dict[str, tickets.Check]:
        flags = {
            "price_per_unit": 10**14,
            "ticket_ev": 10**12,
            "face_value": 10**15,
            "max_price_per_unit": 0,  # -maxPricePerUnit 0: any price
            "max_ticket_ev": 3 * 10**12,
            "max_face_value": 10**15,
        }
        return {c.parameter: c for c in tickets.consistency(**(flags | kw))}

    assert rows()["`pricePerUnit` / `maxPricePerUnit`"].verdict == "✅ no limit"
    same = rows(ticket_ev=10**15, max_ticket_ev=10**16)  # winProb 1: "faceValue too low"
    assert not same["`ticketEV` / `faceValue`"].ok
    assert go_validate(10**15, MAX_UINT256, Fraction(10**16), Fraction(10**16), 10**15, 1)
    uncapped = rows(face_value=0)["`faceValue` / `maxFaceValue`"]  # -maxFaceValue 0: no cap
    assert not uncapped.ok and uncapped.verdict == "❌ no cap (0)"
    limited = rows(deposit=10**15, deposit_multiplier=2)["`faceValue` / `maxFaceValue`"]
    assert limited.gateway == 5 * 10**14 and not limited.ok  # deposit / -depositMultiplier
