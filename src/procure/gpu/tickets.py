"""Livepeer probabilistic tickets (go-livepeer's pm/): winProb as 256-bit fixed point from
ticketEV and faceValue exactly as go-livepeer's recipient computes it (and back), the payout's
mean and spread over N jobs, the winning check, and seed 003's consistency check of orchestrator
flags against gateway flags, judged as go-livepeer's gateway judges ticket params."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from eth_hash.auto import keccak

from procure.numbers import small_exponent

MAX_WIN_PROB = 2**256 - 1
"""winProb of a ticket that always wins: probabilities are fractions of this."""
UNITS = {"wei": 1, "gwei": 10**9, "eth": 10**18}
_LOW_64 = 2**64 - 1


def win_prob(ticket_ev: int, face_value: int) -> int:
    """go-livepeer's `recipient.winProb` exactly (pm/recipient.go): 0 for a zero faceValue,
    MaxUint256 when faceValue equals ticketEV, else ticketEV x (MaxUint256 div faceValue), plus
    one in the quotient when the division leaves a remainder. Like go-livepeer, "a remainder" is
    judged by `m.Int64() != 0`: the remainder's low 64 bits, so a remainder that is a non-zero
    multiple of 2^64 (possible only for faceValues above 2^64 wei) rounds down there too."""
    if face_value < 0 or ticket_ev < 0:
        raise ValueError("ticketEV and faceValue cannot be negative")
    if face_value == 0:
        return 0
    if face_value == ticket_ev:
        return MAX_WIN_PROB
    if ticket_ev > face_value:
        raise ValueError("ticketEV must be between 0 and faceValue (winProb at most 1)")
    quotient, remainder = divmod(MAX_WIN_PROB, face_value)
    if remainder & _LOW_64:  # big.Int.Int64() keeps the low 64 bits
        quotient += 1
    fixed = ticket_ev * quotient
    if fixed > MAX_WIN_PROB:
        # go-livepeer would send it, but no uint256 holds it: the TicketBroker cannot take it.
        raise ValueError("winProb would not fit in 256 bits for this faceValue")
    return fixed


def ticket_ev_of(face_value: int, fixed: int) -> Fraction:
    """go-livepeer's `ticketEV`: faceValue x winProb / MaxUint256, exactly (what a gateway
    compares with its -maxTicketEV; rounding winProb up makes it slightly above -ticketEV)."""
    return Fraction(face_value * fixed, MAX_WIN_PROB)


def probability(fixed: int) -> Fraction:
    """The exact probability a 256-bit winProb stands for."""
    if not 0 <= fixed <= MAX_WIN_PROB:
        raise ValueError("winProb must fit in 256 bits")
    return Fraction(fixed, MAX_WIN_PROB)


def to_fixed(p: float | Fraction) -> int:
    """A probability in [0, 1] as a 256-bit winProb (rounded down)."""
    p = Fraction(p)
    if not 0 <= p <= 1:
        raise ValueError("a probability is between 0 and 1")
    return math.floor(p * MAX_WIN_PROB)


def expected_value(face_value: int, fixed: int) -> Fraction:
    """What one ticket is worth on average, in wei (exact)."""
    return face_value * probability(fixed)


@dataclass(frozen=True)
class Payout:
    """What a worker sees over `jobs` tickets: mean, standard deviation, and the chance that
    not one of them wins (it is paid nothing at all)."""

    jobs: int
    mean_wei: float
    std_wei: float
    p_no_win: float

    def to_json(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "meanWei": self.mean_wei,
            "stdWei": self.std_wei,
            "coefficientOfVariation": self.std_wei / self.mean_wei if self.mean_wei else None,
            "pNoWin": self.p_no_win,
        }


def payout(face_value: int, fixed: int, jobs: int) -> Payout:
    """Each ticket pays faceValue with probability p: mean N·F·p, variance N·F²·p·(1-p)."""
    p = float(probability(fixed))
    mean = jobs * face_value * p
    std = face_value * math.sqrt(jobs * p * (1 - p))
    return Payout(jobs, mean, std, (1 - p) ** jobs)


def wins(signature: bytes, recipient_rand: int, fixed: int) -> bool:
    """go-livepeer's check: uint256(keccak256(signature ‖ recipientRand as 32 bytes)) < winProb."""
    if not 0 <= recipient_rand < 2**256:
        raise ValueError("recipientRand must fit in 256 bits")
    if not 0 <= fixed <= MAX_WIN_PROB:  # no ticket carries one: beyond it every ticket "wins"
        raise ValueError("winProb must fit in 256 bits")
    digest = keccak(signature + recipient_rand.to_bytes(32, "big"))
    return int.from_bytes(digest, "big") < fixed


def parse_wei(text: str) -> int:
    """`29000000000000`, `29e12`, `18 gwei`, `0.001 eth` → wei (exactly; no float rounding)."""
    found = re.fullmatch(r"\s*([0-9][0-9_ ]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in ("", *UNITS):
        raise ValueError(f"not an amount: {text!r} (e.g. 29000000000000, 18gwei, 0.001eth)")
    small_exponent(text)  # 1e999999999 is refused here, before Fraction computes 10**n
    amount = (
        Fraction(found.group(1).replace("_", "").replace(" ", "")) * UNITS[found.group(2) or "wei"]
    )
    if amount.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of wei")
    return int(amount)


def spaced(wei: int) -> str:
    """`100000000000000` → `100 000 000 000 000`, as the seed writes amounts."""
    return f"{wei:,}".replace(",", " ")


@dataclass(frozen=True)
class Check:
    """One row of the seed's table: an orchestrator setting against the gateway's ceiling, judged
    as go-livepeer judges it. `compared` is what go-livepeer actually compares when that is not
    the flag itself (the ticket's EV from its rounded-up winProb); `strict` when equality is
    refused too; `zero_is_no_limit` for gateway flags whose 0 means any value (-maxPricePerUnit);
    `uncapped` when the orchestrator's flag is 0, which sets no cap (-maxFaceValue)."""

    parameter: str
    orchestrator: int
    gateway: int
    compared: Fraction | None = None
    strict: bool = False
    zero_is_no_limit: bool = False
    uncapped: bool = False

    @property
    def value(self) -> Fraction:
        return Fraction(self.orchestrator) if self.compared is None else self.compared

    @property
    def ok(self) -> bool:
        if self.zero_is_no_limit and self.gateway == 0:
            return True
        if self.uncapped:
            return False
        return self.value < self.gateway if self.strict else self.value <= self.gateway

    @property
    def verdict(self) -> str:
        if self.zero_is_no_limit and self.gateway == 0:
            return "✅ no limit"
        if self.uncapped:
            return "❌ no cap (0)"
        if not self.ok:
            return "❌ over the limit"
        return "✅ equal" if self.value == self.gateway else "✅ within limit"

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "parameter": self.parameter,
            "orchestrator": str(self.orchestrator),
            "gateway": str(self.gateway),
            "ok": self.ok,
            "verdict": self.verdict,
        }
        if self.compared is not None:
            answer["compared"] = str(self.compared)
        return answer


def _go_win_prob(ticket_ev: int, face_value: int) -> int:
    """go-livepeer's formula without procure's guards (what it computes for any input)."""
    if face_value == 0:
        return 0
    if face_value == ticket_ev:
        return MAX_WIN_PROB
    quotient, remainder = divmod(MAX_WIN_PROB, face_value)
    return ticket_ev * (quotient + 1 if remainder & _LOW_64 else quotient)


def consistency(
    *,
    price_per_unit: int,
    ticket_ev: int,
    face_value: int,
    max_price_per_unit: int,
    max_ticket_ev: int,
    max_face_value: int,
    max_total_ev: int | None = None,
    capability_price_per_unit: int | None = None,
    deposit: int | None = None,
    deposit_multiplier: int = 1,
) -> list[Check]:
    """Orchestrator flags against a gateway's, meaning what go-livepeer's flags mean:

    - `-pricePerUnit` against the gateway's `-maxPricePerUnit` (0 there: any price);
    - the ticket's EV against `-maxTicketEV` (and, for one ticket, `-maxTotalEV`): the EV the
      gateway computes, faceValue x winProb / MaxUint256, with winProb rounded up as the
      orchestrator rounds it, so a `-ticketEV` equal to the ceiling can still be refused;
    - the orchestrator's `-maxFaceValue` (0: no cap) against the largest faceValue the gateway
      accepts, its deposit / `-depositMultiplier` (`max_face_value` when no deposit is given);
    - the ticket's EV strictly under its faceValue (the gateway refuses "faceValue too low").

    The seed's three rows come first, in its order."""
    fixed = _go_win_prob(ticket_ev, face_value)
    ev = ticket_ev_of(face_value, fixed)
    face_limit = max_face_value if deposit is None else deposit // max(1, deposit_multiplier)
    checks = [
        Check(
            "`pricePerUnit` / `maxPricePerUnit`",
            price_per_unit,
            max_price_per_unit,
            zero_is_no_limit=True,
        ),
        Check("`ticketEV` / `maxTicketEV`", ticket_ev, max_ticket_ev, compared=ev),
        Check("`faceValue` / `maxFaceValue`", face_value, face_limit, uncapped=face_value == 0),
    ]
    if max_total_ev is not None:
        checks.append(Check("`ticketEV` / `maxTotalEV`", ticket_ev, max_total_ev, compared=ev))
    if face_value > 0:
        checks.append(Check("`ticketEV` / `faceValue`", ticket_ev, face_value, ev, strict=True))
    if capability_price_per_unit is not None:
        checks.append(
            Check(
                "`CAPABILITY_PRICE_PER_UNIT` / `maxPricePerUnit`",
                capability_price_per_unit,
                max_price_per_unit,
                zero_is_no_limit=True,
            )
        )
    return checks


def table(checks: list[Check]) -> str:
    """The seed's Markdown table (section 6.5)."""
    lines = [
        "| Parameter | Orchestrator | Gateway | ✅ OK / ❌ Mismatch |",
        "|-----------|--------------|---------|-------------------|",
    ]
    for c in checks:
        lines.append(
            f"| {c.parameter} | `{spaced(c.orchestrator)}` | `{spaced(c.gateway)}` | {c.verdict} |"
        )
    return "\n".join(lines)
