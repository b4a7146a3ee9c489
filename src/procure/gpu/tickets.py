"""Livepeer probabilistic tickets (go-livepeer's pm/): winProb as 256-bit fixed point from
ticketEV and faceValue (and back), the payout's mean and spread over N jobs, the winning check,
and seed 003's consistency check of orchestrator flags against gateway flags."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from eth_hash.auto import keccak

MAX_WIN_PROB = 2**256 - 1
"""winProb of a ticket that always wins: probabilities are fractions of this."""
UNITS = {"wei": 1, "gwei": 10**9, "eth": 10**18}


def win_prob(ticket_ev: int, face_value: int) -> int:
    """winProb = ticketEV * (2^256 - 1) / faceValue, rounded down as go-livepeer does."""
    if face_value <= 0:
        raise ValueError("faceValue must be positive")
    if not 0 <= ticket_ev <= face_value:
        raise ValueError("ticketEV must be between 0 and faceValue (winProb at most 1)")
    return ticket_ev * MAX_WIN_PROB // face_value


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
    digest = keccak(signature + recipient_rand.to_bytes(32, "big"))
    return int.from_bytes(digest, "big") < fixed


def parse_wei(text: str) -> int:
    """`29000000000000`, `29e12`, `18 gwei`, `0.001 eth` → wei (exactly; no float rounding)."""
    found = re.fullmatch(r"\s*([0-9][0-9_ ]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not found or found.group(2) not in ("", *UNITS):
        raise ValueError(f"not an amount: {text!r} (e.g. 29000000000000, 18gwei, 0.001eth)")
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
    """One row of the seed's table: an orchestrator setting against the gateway's ceiling."""

    parameter: str
    orchestrator: int
    gateway: int

    @property
    def ok(self) -> bool:
        return self.orchestrator <= self.gateway

    @property
    def verdict(self) -> str:
        if self.orchestrator > self.gateway:
            return "❌ over the limit"
        return "✅ equal" if self.orchestrator == self.gateway else "✅ within limit"

    def to_json(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "orchestrator": str(self.orchestrator),
            "gateway": str(self.gateway),
            "ok": self.ok,
            "verdict": self.verdict,
        }


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
) -> list[Check]:
    """Orchestrator flags (`-pricePerUnit`, `-ticketEV`, `-maxFaceValue`) against the gateway's
    (`-maxPricePerUnit`, `-maxTicketEV`, `-maxFaceValue`, `-maxTotalEV`): each must not exceed
    its ceiling, or the gateway refuses the orchestrator's tickets or price. The seed's three
    rows come first, in its order."""
    checks = [
        Check("`pricePerUnit` / `maxPricePerUnit`", price_per_unit, max_price_per_unit),
        Check("`ticketEV` / `maxTicketEV`", ticket_ev, max_ticket_ev),
        Check("`faceValue` / `maxFaceValue`", face_value, max_face_value),
    ]
    if max_total_ev is not None:
        checks.append(Check("`ticketEV` / `maxTotalEV`", ticket_ev, max_total_ev))
    if capability_price_per_unit is not None:
        checks.append(
            Check(
                "`CAPABILITY_PRICE_PER_UNIT` / `maxPricePerUnit`",
                capability_price_per_unit,
                max_price_per_unit,
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
