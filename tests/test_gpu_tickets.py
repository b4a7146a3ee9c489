"""Probabilistic tickets: the seed's worked example and consistency table through `procure
tickets`, go-livepeer's fixed-point winProb and winning check, and property tests that the win
rate and the mean payout match winProb and ticketEV over many random tickets."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest
from Crypto.Hash import keccak as pycryptodome_keccak
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from procure.cli import app
from procure.gpu import tickets
from procure.gpu.tickets import MAX_WIN_PROB
from world import procure_cli

GWEI = 10**9
SEED_TABLE = """\
| Parameter | Orchestrator | Gateway | ✅ OK / ❌ Mismatch |
|-----------|--------------|---------|-------------------|
| `pricePerUnit` / `maxPricePerUnit` | `100 000 000 000 000` | `130 000 000 000 000` | ✅ within limit |
| `ticketEV` / `maxTicketEV` | `29 000 000 000 000` | `300 000 000 000 000` | ✅ within limit |
| `faceValue` / `maxFaceValue` | `1 000 000 000 000 000` | `1 000 000 000 000 000` | ✅ equal |
"""  # noqa: E501 (the seed's table, verbatim)
runner = CliRunner()


def test_check_with_the_seeds_numbers_reproduces_its_table() -> None:
    result = procure_cli("tickets", "check", env={})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(SEED_TABLE)
    assert "winProb = ticketEV / faceValue = 0.029" in result.stdout


@pytest.mark.parametrize(
    ("flag", "value", "row"),
    [
        ("--ticket-ev", "400000000000000", "| `ticketEV` / `maxTicketEV` | `400 000 000 000 000`"),
        ("--price-per-unit", "140000000000000", "`pricePerUnit` / `maxPricePerUnit`"),
        ("--max-face-value", "999999999999999", "`faceValue` / `maxFaceValue`"),
        ("--max-total-ev", "1gwei", "`ticketEV` / `maxTotalEV`"),
        ("--capability-price-per-unit", "200000000000000", "`CAPABILITY_PRICE_PER_UNIT`"),
    ],
)
def test_a_mismatch_is_marked_and_exits_non_zero(flag: str, value: str, row: str) -> None:
    result = runner.invoke(app, ["tickets", "check", flag, value])
    assert result.exit_code == 1
    (line,) = [line for line in result.stdout.splitlines() if row in line]
    assert line.endswith("❌ over the limit |")
    assert "Mismatch" in result.stdout


def test_a_ticket_ev_above_the_face_value_is_a_mismatch() -> None:
    result = runner.invoke(
        app, ["tickets", "check", "--ticket-ev", "2gwei", "--face-value", "1gwei"]
    )
    assert result.exit_code == 1 and "winProb would be above 1" in result.stdout


def test_the_worked_example_gives_win_prob_one_tenth() -> None:
    result = procure_cli(
        "tickets", "winprob", "--ticket-ev", "18gwei", "--face-value", "180gwei", "--json", env={}
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["winProb"] == 0.1
    # go-livepeer rounds the quotient up: 180 gwei does not divide 2^256 - 1.
    assert int(answer["winProbFixed"]) == 18 * GWEI * (MAX_WIN_PROB // (180 * GWEI) + 1)
    assert answer["expectedValueWei"] == str(18 * GWEI)
    # Over 100 jobs: mean 100 x 18 gwei, std 180 gwei x sqrt(100 x 0.1 x 0.9).
    assert answer["payout"]["meanWei"] == pytest.approx(1800 * GWEI)
    assert answer["payout"]["stdWei"] == pytest.approx(540 * GWEI)
    assert answer["payout"]["pNoWin"] == pytest.approx(0.9**100)


def test_amounts_take_units_and_refuse_nonsense() -> None:
    assert tickets.parse_wei("18gwei") == 18 * GWEI
    assert tickets.parse_wei("0.001 eth") == 10**15
    assert tickets.parse_wei("29e12") == 29 * 10**12
    assert tickets.parse_wei("1_000") == 1000
    for bad in ("abc", "0.5", "-3", "12 dollars", ""):
        with pytest.raises(ValueError):
            tickets.parse_wei(bad)
    result = runner.invoke(app, ["tickets", "winprob", "--ticket-ev", "x", "--face-value", "1"])
    assert result.exit_code == 2


def _independent_wins(signature: bytes, rand: int, fixed: int) -> bool:
    digest = pycryptodome_keccak.new(digest_bits=256, data=signature + rand.to_bytes(32, "big"))
    return int.from_bytes(digest.digest(), "big") < fixed


@given(st.binary(min_size=0, max_size=80), st.integers(0, 2**256 - 1), st.integers(0, MAX_WIN_PROB))
def test_the_winning_check_is_go_livepeers(signature: bytes, rand: int, fixed: int) -> None:
    assert tickets.wins(signature, rand, fixed) == _independent_wins(signature, rand, fixed)
    assert not tickets.wins(signature, rand, 0)


def test_the_wins_command_answers_with_its_exit_status() -> None:
    sig, rand = "0x" + "ab" * 65, "12345"
    assert (
        runner.invoke(
            app,
            ["tickets", "wins", "--signature", sig, "--recipient-rand", rand, "--win-prob", "1"],
        ).exit_code
        == 0
    )
    never = runner.invoke(
        app,
        ["tickets", "wins", "--signature", sig, "--recipient-rand", rand, "--win-prob-fixed", "0"],
    )
    assert never.exit_code == 1 and "not a winning ticket" in never.stdout


@given(st.integers(1, 10**27), st.data())
def test_win_prob_and_expected_value_round_trip(face: int, data: st.DataObject) -> None:
    ev = data.draw(st.integers(0, face))
    fixed = tickets.win_prob(ev, face)
    back = tickets.expected_value(face, fixed)
    assert ev - 1 < back < ev + 1  # go-livepeer's rounding: within a wei of what was asked


@given(st.integers(0, MAX_WIN_PROB))
def test_fixed_point_round_trips(fixed: int) -> None:
    assert tickets.to_fixed(tickets.probability(fixed)) == fixed


@given(st.floats(0, 1))
def test_probabilities_round_trip(p: float) -> None:
    assert abs(float(tickets.probability(tickets.to_fixed(p))) - p) <= 1e-15


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    p=st.floats(0.02, 0.98),
    face=st.integers(10**9, 10**18),
    seed=st.integers(0, 2**32 - 1),
)
def test_win_rate_and_mean_payout_match_win_prob_and_ticket_ev(
    p: float, face: int, seed: int
) -> None:
    ev = math.floor(face * p)
    fixed = tickets.win_prob(ev, face)
    prob = float(tickets.probability(fixed))
    rng = random.Random(seed)
    n = 3000
    won = sum(tickets.wins(rng.randbytes(65), rng.getrandbits(256), fixed) for _ in range(n))
    sigma = math.sqrt(n * prob * (1 - prob))
    assert abs(won - n * prob) <= 5 * sigma  # a false alarm about once in 1.7 million
    mean_payout = Fraction(won * face, n)
    assert abs(mean_payout - ev) <= 5 * face * sigma / n + 1
