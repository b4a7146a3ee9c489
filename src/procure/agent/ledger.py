"""The agent's side of the global spend ledger: a payment is started only if the caps on total
spend per hour, day and month (agent payments and fleet instance-hours together) still allow it.
A capped run waits (the windows roll), saying why once, not on every tick."""

from __future__ import annotations

from sqlalchemy.orm import Session

from procure.agent.deps import OBS, AgentDeps
from procure.models import utcnow
from procure.store import repo
from procure.store.ledger import global_cap_conflict


def spend_cap_blocks(deps: AgentDeps, s: Session, run_id: str, amount: int, what: str) -> bool:
    """Whether the global caps forbid paying `amount` now, in the transaction `s` that records
    the payment's intent (the ledger fences it against concurrent spenders)."""
    conflict = global_cap_conflict(s, deps.spend_caps, amount, now=utcnow())
    if conflict is None:
        return False
    note = f"Waiting to pay for {what}: {conflict}"
    # Said once per cap: the figures after the last ": " (the window's spend to the cent) move
    # every few seconds while an instance runs, and a run ticked every second would say it anew.
    said = note.rsplit(": ", 1)[0]
    if not any(c.startswith(said) for c in repo.recent_contents(s, run_id)):
        repo.add_observation(s, run_id, OBS.agent_reasoning, note)
    return True
