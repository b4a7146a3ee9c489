"""What a planner sees of a run: its state, the vendors, and what went wrong this run.

A planner may also leave notes on the context (e.g. the LLM planner's raw answer and why it was
rejected); the tick stores them as observations of the run once the planner has returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from procure.models import ObservationType, PaymentStatus, RunState, Vendor, utcnow

# Beta-prior strength given to a vendor's registered reliability score, in pseudo-jobs.
PRIOR_STRENGTH = 10.0


def reliability(vendor: Vendor) -> float:
    """Posterior mean of the vendor's success probability: registry prior + observed outcomes."""
    alpha = vendor.reliability_score * PRIOR_STRENGTH + vendor.successes
    beta = (1 - vendor.reliability_score) * PRIOR_STRENGTH + vendor.failures
    return alpha / (alpha + beta)


@dataclass(frozen=True)
class PlanContext:
    state: RunState
    vendors: list[Vendor]
    errors_by_vendor: dict[str, int] = field(default_factory=dict)
    now: datetime = field(default_factory=utcnow)
    notes: list[tuple[ObservationType, str]] = field(default_factory=list, compare=False)
    """Observations the planner wants stored (type, content); the tick writes them after planning.
    Never attributed to a vendor, so they do not count as that vendor's errors this run."""

    @property
    def committed(self) -> int:
        """Money paid or promised (pending) in this run, in micro-USD."""
        return sum(
            p.amount
            for p in self.state.payments
            if p.status in (PaymentStatus.completed, PaymentStatus.pending)
        )

    @property
    def available(self) -> int:
        """What may still be spent: the budget less everything paid or pending."""
        return self.state.run.budget_total - self.committed

    def failures_in_run(self, vendor_id: str) -> int:
        """Trouble with a vendor this run: each failed job and vendor error is an error obs."""
        return self.errors_by_vendor.get(vendor_id, 0)

    def vendor(self, vendor_id: str | None) -> Vendor | None:
        return next((v for v in self.vendors if v.vendor_id == vendor_id), None)

    def cooling_down(self, vendor: Vendor) -> bool:
        return vendor.cooldown_until is not None and vendor.cooldown_until > self.now
