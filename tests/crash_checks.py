"""What the crash campaign (`tests/crash_harness.py`) checks after every worker's death: the
invariants on the store, the chain and the vendors, and the figures it reports at the end.

Each check reads what the dead workers left; none kills or starts anything. At any moment:

* no run's completed and pending payments exceed its budget (`budget_problems`);
* no EIP-3009 nonce is used twice, and every nonce the wallet used on the chain belongs to a
  payment the store does not hold as failed (`chain_problems`);
* the chain's transfers to a vendor are never more than the store's payments to it
  (`transfer_problems`);
* no vendor started a job twice for one idempotency key, and every started job is a job the
  store paid for (`vendor_problems`).

At the end (`final`), after the last worker drained every run, also: every run is terminal and
no payment is left pending; every used nonce belongs to a completed payment; the transfers to
each vendor equal the store's completed payments to it, in count, sum and transaction hashes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

SECRET = "crash-test-secret"
"""The mock vendors' secret: the workers' credential, and the bearer of the vendors' admin API."""


@dataclass
class CrashReport:
    """A campaign's figures: the deaths (counted as they happen) and, at the end, what the store,
    the chain and the vendors hold (`tally`)."""

    kills: int = 0
    by_signal: int = 0
    by_crash_point: Counter[str] = field(default_factory=Counter)
    lifetimes_s: list[float] = field(default_factory=list)
    runs: Counter[str] = field(default_factory=Counter)
    payments: Counter[str] = field(default_factory=Counter)
    transfers: int = 0
    paid_usd: float = 0.0
    vendor_submissions: int = 0
    vendor_starts: int = 0
    vendor_replays: int = 0
    vendor_renewals: int = 0
    """Slices bought as jobs ran (each its own payment): the campaign covers renewals."""
    cancels_requested: int = 0
    reconciled_jobs: int = 0
    checks: int = 0
    seconds: float = 0.0
    setup_s: float = 0.0
    """Until the first worker was forked (the world, the zygote's imports)."""
    drain_s: float = 0.0
    check_s: float = 0.0
    missed: Counter[str] = field(default_factory=Counter)
    """Scheduled crash points whose worker was killed by the backstop, not at the point."""
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        lifetimes = sorted(self.lifetimes_s)
        data.pop("lifetimes_s")
        data["median_life_s"] = round(lifetimes[len(lifetimes) // 2], 3) if lifetimes else 0
        data["by_crash_point"] = dict(sorted(self.by_crash_point.items()))
        data["missed"] = dict(self.missed)
        data["runs"] = dict(self.runs)
        data["payments"] = dict(self.payments)
        data["paid_usd"] = round(self.paid_usd, 6)
        data["seconds"] = round(self.seconds, 1)
        data["setup_s"] = round(self.setup_s, 1)
        data["drain_s"] = round(self.drain_s, 1)
        data["check_s"] = round(self.check_s, 1)
        data["kills_per_s"] = round(self.kills / self.seconds, 2) if self.seconds else 0
        return data


class InvariantViolation(AssertionError):
    """An invariant did not hold: money lost, paid twice or over budget, or a run never ended."""


@dataclass
class CrashWorld:
    """What the checks read: the store, the chain (whose events are read incrementally), the
    wallet that pays, and the mock vendors with their admin API."""

    store: Any
    chain: Any
    wallet: str
    vendors: dict[str, Any]
    vendor_servers: list[Any]
    used: list[dict[str, Any]] = field(default_factory=list)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    http: Any = None

    def refresh_chain(self) -> None:
        """Read the chain's new events only (a full scan per check grows with the chain)."""
        after = self.used[-1]["block_number"] + 1 if self.used else 0
        self.used += self.chain.used_authorizations(self.wallet, from_block=after)
        after = self.transfers[-1]["block_number"] + 1 if self.transfers else 0
        self.transfers += self.chain.transfers(from_block=after)

    def client(self) -> Any:
        import httpx

        if self.http is None:  # one client: a new one per call costs a TLS context (30 ms)
            self.http = httpx.Client(headers={"Authorization": f"Bearer {SECRET}"}, timeout=30)
        return self.http

    def vendor_stats(self) -> dict[str, dict[str, Any]]:
        """Each mock vendor's figures: submissions, paid starts, replays, and per key."""
        stats = {}
        for vendor_id, server in zip(self.vendors, self.vendor_servers, strict=True):
            response = self.client().get(f"{server.url}/admin/stats")
            response.raise_for_status()
            stats[vendor_id] = response.json()
        return stats


def stuck_runs(store: Any) -> str:
    """The last words of the runs still running, to say why they are."""
    from procure.store import repo

    lines = []
    with store.session() as s:
        for run in repo.list_runs(s, limit=5, status="running"):
            state = repo.load_state(s, run.id)
            if state is not None:
                lines.append(f"{run.id}: {[o.content[:160] for o in state.observations[-2:]]}")
    return "; ".join(lines)


def check_invariants(world: CrashWorld, budget: int, *, final: bool) -> None:
    """Every invariant that must hold at any moment (and, if `final`, at the end); raise
    `InvariantViolation` naming the first 20 problems. The store is read first, then the chain,
    then the vendors (see `transfer_problems` for why the order matters)."""
    from sqlalchemy import select

    from procure.store.tables import JobRow, PaymentRow, RunRow

    with world.store.session() as s:
        runs = list(s.scalars(select(RunRow)))
        jobs = list(s.scalars(select(JobRow)))
        payments = list(s.scalars(select(PaymentRow)))
    problems = budget_problems(runs, jobs, payments, final=final)
    world.refresh_chain()
    problems += chain_problems(world, payments, final=final)
    problems += transfer_problems(world, payments, final=final)
    problems += vendor_problems(world.vendor_stats(), jobs, payments, final=final)
    if problems:
        raise InvariantViolation("; ".join(problems[:20]))


def budget_problems(
    runs: list[Any], jobs: list[Any], payments: list[Any], *, final: bool
) -> list[str]:
    """Never over budget: a run's completed and pending payments never exceed its budget, and it
    has one active job at most; at the end, every run ended and its budgetRemaining is its
    budget less its completed payments."""
    problems: list[str] = []
    committed: Counter[str] = Counter()
    completed: Counter[str] = Counter()
    for p in payments:
        if p.status in ("completed", "pending"):
            committed[p.run_id] += p.amount
        if p.status == "completed":
            completed[p.run_id] += p.amount
    active: Counter[str] = Counter(j.run_id for j in jobs if j.status in ("submitted", "running"))
    for run in runs:
        if committed[run.id] > run.budget_total:
            problems.append(f"run {run.id}: {committed[run.id]} committed > {run.budget_total}")
        if active[run.id] > 1:
            problems.append(f"run {run.id}: {active[run.id]} active jobs")
        if final and run.budget_remaining != run.budget_total - completed[run.id]:
            problems.append(f"run {run.id}: budgetRemaining {run.budget_remaining} is stale")
        if final and run.status == "running":
            problems.append(f"run {run.id} is still running")
    return problems


def _used_nonces(world: CrashWorld) -> list[tuple[str, str]]:
    """(nonce, transaction hash) of each authorisation the wallet used on the chain."""
    return [(u["nonce"], u["tx_hash"]) for u in world.used]


def chain_problems(world: CrashWorld, payments: list[Any], *, final: bool) -> list[str]:
    """Never paid twice: each nonce is used once on the chain, and each used nonce is a payment
    the store does not call failed (at the end: completed); each completed payment settled on
    the chain, under the transaction it records; at the end, none is left pending. Reads the
    chain's events as of the last `refresh_chain`."""
    problems: list[str] = []
    by_nonce = {p.nonce.lower(): p for p in payments}
    used_nonces = _used_nonces(world)
    if len({n for n, _ in used_nonces}) != len(used_nonces):
        problems.append("a nonce was used twice on the chain")
    tx_of_nonce = dict(used_nonces)
    for nonce, tx in used_nonces:
        payment = by_nonce.get(nonce)
        if payment is None:
            problems.append(f"nonce {nonce} settled (tx {tx}) but no payment holds it")
        elif payment.status == "failed":
            problems.append(f"payment {payment.id} is failed but settled on chain (tx {tx})")
        elif final and payment.status != "completed":
            problems.append(f"payment {payment.id} settled on chain but left {payment.status}")
    for p in payments:
        if p.status == "completed" and p.nonce.lower() not in tx_of_nonce:
            problems.append(f"payment {p.id} completed in the store, never settled on chain")
        if p.status == "completed" and p.x402_tx_id not in (None, tx_of_nonce.get(p.nonce.lower())):
            problems.append(f"payment {p.id} records tx {p.x402_tx_id}, the chain another")
        if final and p.status == "pending":
            problems.append(f"payment {p.id} left pending")
    return problems


def transfer_problems(world: CrashWorld, payments: list[Any], *, final: bool) -> list[str]:
    """The ledgers agree: the chain's transfers to each vendor are never more than the store's
    completed and pending payments to it; at the end, one transfer per used nonce, and the
    transfers to each vendor equal its completed payments, amount for amount."""
    # The chain moves on while we look: a dead worker's request may still settle. Events are
    # read after the store, and transfers after authorisations, so newer transfers are left out.
    problems: list[str] = []
    used_nonces = _used_nonces(world)
    settled_txs = set(dict(used_nonces).values())
    transfers = [t for t in world.transfers if t["from"].lower() == world.wallet.lower()]
    if final and len(transfers) != len(used_nonces):
        problems.append(f"{len(transfers)} transfers from the wallet, {len(used_nonces)} nonces")
    transfers = [t for t in transfers if t["tx_hash"] in settled_txs]
    for vendor_id, vendor in world.vendors.items():
        on_chain = sorted(t["value"] for t in transfers if t["to"] == vendor.pay_to)
        in_store = sorted(
            p.amount
            for p in payments
            if p.vendor_id == vendor_id
            and p.status in (("completed",) if final else ("completed", "pending"))
        )
        if final and on_chain != in_store:
            problems.append(f"{vendor_id}: chain paid {on_chain}, store completed {in_store}")
        if not final and len(on_chain) > len(in_store):
            problems.append(f"{vendor_id}: {len(on_chain)} transfers > {len(in_store)} payments")
    return problems


def vendor_problems(
    stats: dict[str, dict[str, Any]], jobs: list[Any], payments: list[Any], *, final: bool
) -> list[str]:
    """Never started twice: each vendor (`stats`: `CrashWorld.vendor_stats`) started one job or
    slice per idempotency key at most, and only for what the store paid for (at the end: a
    completed payment)."""
    problems: list[str] = []
    jobs_by_key = {j.idempotency_key: j for j in jobs}
    by_id = {p.id: p for p in payments}
    for vendor_id, vendor_stats in stats.items():
        for key, figures in vendor_stats["keys"].items():
            if figures["started"] > 1:
                problems.append(f"{vendor_id} started key {key} {figures['started']} times")
            if not figures["started"]:
                continue
            if key.startswith("slice-"):  # a renewal: one payment of its own
                slice_payment = by_id.get(key.removeprefix("slice-"))
                paid = [slice_payment] if slice_payment is not None else []
            else:
                job = jobs_by_key.get(key)
                paid = [p for p in payments if job is not None and p.job_id == job.id]
            if not paid:
                problems.append(f"{vendor_id} started key {key}, unknown to the store")
            elif final and not any(p.status == "completed" for p in paid):
                problems.append(f"{vendor_id} started key {key}, its payment not completed")
    return problems


def tally(world: CrashWorld, report: CrashReport) -> None:
    """Fill `report` with the end's figures: runs and payments by status, jobs reconciled,
    transfers and dollars paid on the chain, and the vendors' submissions, starts, replays and
    renewals."""
    from sqlalchemy import func, select

    from procure.store.tables import ObservationRow, PaymentRow, RunRow

    with world.store.session() as s:
        report.runs = Counter(
            dict(s.execute(select(RunRow.status, func.count()).group_by(RunRow.status)).all())
        )  # type: ignore[arg-type]
        report.payments = Counter(
            dict(
                s.execute(select(PaymentRow.status, func.count()).group_by(PaymentRow.status)).all()
            )
        )  # type: ignore[arg-type]
        report.reconciled_jobs = int(
            s.scalar(
                select(func.count())
                .select_from(ObservationRow)
                .where(ObservationRow.content.like("%reconciled%"))
            )
            or 0
        )
    world.refresh_chain()
    transfers = [t for t in world.transfers if t["from"].lower() == world.wallet.lower()]
    report.transfers = len(transfers)
    report.paid_usd = sum(t["value"] for t in transfers) / 1e6
    for stats in world.vendor_stats().values():
        report.vendor_submissions += stats["submissions"]
        report.vendor_starts += stats["started"]
        report.vendor_replays += stats["replays"]
        report.vendor_renewals += sum(
            1 for key, k in stats["keys"].items() if key.startswith("slice-") and k["started"]
        )
