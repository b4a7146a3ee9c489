"""The gateway, a hostile reviewer's third look: what a buyer's bearer may read of the
operator's book (`/gateway/status`, `/metrics`); a job's `PROCURE_CHECKPOINT` lines kept only
when the node can resume from them and they name no other job's folder of the checkpoint store;
a renewal booked as (or after) its job is ended for want of paid time gives the time it paid
for; quotes asked together read the cloud's catalogue once; an id no store can hold is an
unknown id, not a 500."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import procure.gateway.serve as gateway_serve
from procure.clouds.base import CapacityError, ProviderError
from procure.gateway import book
from procure.gateway import loop as gateway_loop
from procure.models import usd_to_micros, utcnow
from procure.store.gateway_tables import GatewayJobRow
from test_gateway import (
    TRAIN,
    GatewayWorld,
    buy,
    buyer,
    job_status,
    nonce,
    quote,
    signed_payment,
    start_gateway_world,
    submit,
    wait_for,
)
from test_gateway_lost_launches_keys_and_quotes import _Ledger
from test_gateway_renewal_in_doubt import renew_in_doubt, run_out_of_paid_time, running_job
from test_unknown_settlement import FlakySettle, flaky_client, paid_out, pending

MONEY = ("incomeUsd", "instanceCostUsd", "marginUsd", "paymentsReceived")
OPERATOR = "operator-scrape-token"


@pytest.fixture
def started() -> Iterator[list[GatewayWorld]]:
    worlds: list[GatewayWorld] = []
    yield worlds
    for g in worlds:
        g.stop()


def _get(g: GatewayWorld, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else g.headers()
    return httpx.get(f"{g.url}{path}", headers=headers, timeout=15)


# --- 1. the operator's money is the operator's --------------------------------------------------


def test_a_buyers_bearer_reads_the_gateways_capacity_but_not_the_operators_money(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: `GET /gateway/status` answered the book's every figure to the buyers'
    bearer, which every buyer holds: any buyer read the operator's income, instance costs and
    margin (and, with a scrape token set, `/metrics` still opened to the buyers' bearer)."""
    monkeypatch.setenv("PROCURE_METRICS_TOKEN", OPERATOR)
    g = start_gateway_world(tmp_path, sqlite_url)
    started.append(g)
    job_id = buy(g, "someone")
    wait_for(lambda: job_status(g, job_id)["status"] == "completed", 60)
    shown = _get(g, "/gateway/status")
    assert shown.status_code == 200, shown.text
    leaked = sorted(set(MONEY) & shown.json().keys())
    assert leaked == [], f"a buyer's bearer read the operator's {leaked}: {shown.json()}"
    # What a buyer needs to know (whether the gateway has room) is still there.
    for name in ("committedUsdPerHour", "committedInstances", "maxHourlyUsd", "maxTotalInstances"):
        assert name in shown.json(), shown.json()
    # The operator, with its own token, reads the whole book.
    book_ = _get(g, "/gateway/status", OPERATOR)
    assert book_.status_code == 200, book_.text
    assert usd_to_micros(book_.json()["incomeUsd"]) == g.income() > 0
    assert _get(g, "/gateway/status", "wrong").status_code == 401
    # /metrics, with the operator's scrape token set, is the operator's only.
    assert _get(g, "/metrics").status_code == 401
    scraped = _get(g, "/metrics", OPERATOR)
    assert scraped.status_code == 200 and "procure_gateway_income_usd_total" in scraped.text


# --- 2. a job's checkpoint lines --------------------------------------------------------------

# The operator's job command, as a real one runs what its buyer sends: the lines in the job's
# params (`say`) are printed as its own, then the training script runs (`train`: its options).
# `hide`: it writes no checkpoint of its own (none the node could report instead).
SAYER = f"""
import json, os, sys
spec = json.loads(os.environ.get("PROCURE_JOB_SPEC") or "{{}}")
for line in spec.get("say", []):  # {{dir}}: its own checkpoint folder
    print(line.replace("{{dir}}", os.environ.get("PROCURE_CHECKPOINT_DIR", "")), flush=True)
env = dict(os.environ)
if spec.get("hide"):
    env.pop("PROCURE_CHECKPOINT_DIR", None)
os.execve(sys.executable, [sys.executable, {TRAIN!r}, *spec.get("train", [])], env)
"""


def _sayer_world(tmp_path: Path, db_url: str, **options: Any) -> GatewayWorld:
    script = tmp_path / "sayer.py"
    script.write_text(SAYER)
    return start_gateway_world(tmp_path, db_url, command=(sys.executable, str(script)), **options)


def _buy_with(g: GatewayWorld, key: str, params: dict[str, Any]) -> str:
    """A job bought with `params` (what its command is told to do); its id."""
    q = quote(g)
    first = submit(g, key, q, jobParams=params)
    assert first.status_code == 402, first.text
    payment = signed_payment(g, first.headers["PAYMENT-REQUIRED"], buyer(g, key), nonce())
    paid = submit(g, key, q, payment, jobParams=params)
    assert paid.status_code == 200, paid.text
    return str(paid.json()["jobId"])


def _preempt(g: GatewayWorld, job_id: str) -> None:
    """The pod the job runs on is preempted (the cloud takes it back)."""
    [pod] = g.live_pods()
    answer = httpx.post(
        f"{g.mock.url}/admin/instances/{pod['id']}/preempt",
        headers={"Authorization": f"Bearer {g.mock.api_key}"},
        timeout=15,
    )
    assert answer.status_code == 200, answer.text


def _steps(n: int, every: int = 5) -> list[str]:
    return ["--steps", str(n), "--step-time", "0.05", "--checkpoint-every", str(every)]


def test_a_job_naming_another_buyers_checkpoint_never_resumes_from_it(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: a job's `PROCURE_CHECKPOINT` line was taken as its checkpoint whatever
    it named: a job printing another buyer's checkpoint URL was shown it as its own (its
    `checkpointUrl`, its artifact once done) and, its instance lost, was relaunched resuming
    from the other buyer's work."""
    g = _sayer_world(tmp_path, sqlite_url)
    started.append(g)
    victim = _buy_with(g, "victim", {"train": _steps(400)})
    theirs = wait_for(lambda: job_status(g, victim).get("checkpointUrl"), 60)
    assert f"/{victim}/" in theirs
    hostile = _buy_with(
        g, "hostile", {"say": [f"PROCURE_CHECKPOINT {theirs}"], "hide": True, "train": _steps(200)}
    )
    wait_for(lambda: any("training 200 steps" in x for x in job_status(g, hostile)["logs"]), 60)
    shown = job_status(g, hostile)
    assert shown["checkpointUrl"] != theirs, "another buyer's checkpoint shown as this job's"
    pods = {p["id"] for p in g.live_pods()}
    httpx.post(f"{g.url}/cancel-job", json={"jobId": victim}, headers=g.headers(), timeout=15)
    wait_for(lambda: len(g.live_pods()) == 1 and {p["id"] for p in g.live_pods()} < pods, 60)
    _preempt(g, hostile)
    done = wait_for(lambda: (s := job_status(g, hostile))["status"] == "completed" and s, 60)
    resumed = [line for line in done["logs"] if "resuming from" in line]
    assert resumed == [], f"resumed from another buyer's checkpoint: {resumed}"
    assert done["artifactUrl"] != theirs


@pytest.mark.parametrize(
    "named",
    ["bogus://nowhere/step-000005.json", "/two words/step.json", "LONG"],
    ids=["unknown-protocol", "spaces", "over-500-chars"],
)
def test_a_checkpoint_line_the_node_cannot_resume_from_does_not_stop_the_replacement(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld], named: str
) -> None:
    """Before the fix: a `PROCURE_CHECKPOINT` value the node cannot use (an unknown protocol,
    a space, a URL over the book's 500 characters cut to 500) was kept as the job's
    checkpoint: its instance lost, every replacement was refused by the node (or resumed from a
    cut path that does not exist and failed), instance after instance, until the paid time ran
    out; the job's own work was never run again."""
    g = _sayer_world(tmp_path, sqlite_url, boot_timeout_s=5.0)
    started.append(g)
    if named == "LONG":  # in the job's own folder, but longer than the book keeps
        named = "{dir}/" + "/".join(["d" * 50] * 12) + "/step-000005.json"
    params: dict[str, Any] = {"say": [f"PROCURE_CHECKPOINT {named}"], "hide": True}
    job_id = _buy_with(g, "garbage", {**params, "train": _steps(200, 100_000)})
    wait_for(lambda: any("training 200 steps" in x for x in job_status(g, job_id)["logs"]), 60)
    wait_for(lambda: (job_status(g, job_id)["progress"] or 0) > 0.05, 60)
    _preempt(g, job_id)
    done = wait_for(
        lambda: (s := job_status(g, job_id))["status"] in ("completed", "failed", "expired") and s,
        90,
    )
    assert done["status"] == "completed", (done["error"], done["logs"][-8:])
    assert len(g.pods()) == 2, "one replacement, taken by its node at once"


# --- 3. a renewal booked while its job is being ended -------------------------------------------


class _TerminateFails:
    """The mock RunPod, its terminate calls failing (provider trouble) while `failing`."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.failing = inner, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def terminate(self, ids: list[str]) -> Any:
        if self.failing:
            raise ProviderError("terminate: 502 Bad Gateway")
        return await self.inner.terminate(ids)


class _NoCapacity:
    """The mock RunPod, every launch refused for capacity (nothing made) while `full`."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.full = inner, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def launch_spec(self, spec: Any) -> Any:
        if self.full:
            raise CapacityError("no longer any instances available")
        return await self.inner.launch_spec(spec)


def _state(g: GatewayWorld, job_id: str) -> tuple[str, str | None]:
    with g.store.session() as s:
        row = book.job(s, job_id)
        assert row is not None
        return row.status, row.outcome


def test_a_renewal_booked_while_its_expired_job_is_being_ended_gives_the_time_it_paid_for(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a renewal whose settle answer was lost, the facilitator's ledger down
    through the job's hold, was booked while its job was being ended for want of paid time
    (its instance's terminate failing a while): its hours were added to a job that then ended
    `expired` all the same; the buyer's money taken, nothing given, and its `paidUntil` in the
    future on an ended job. (Booked a moment later, once `expired`, the job is relaunched.)"""
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    g = start_gateway_world(tmp_path, sqlite_url, command=(sys.executable, TRAIN, *_steps(4000)))
    try:
        facilitator = clients[0]
        rt = g.server.app.state.runtime
        account = buyer(g, "renewer")
        job_id, q1 = running_job(g, account)
        wait_for(lambda: job_status(g, job_id).get("checkpointUrl"), 60)
        facilitator.mode = "held"  # the renewal's settle answer never comes
        rt.ledger = ledger = _Ledger(rt.ledger)  # ... and the ledger cannot say
        q2, _, _ = renew_in_doubt(g, job_id, account)
        rt.cloud = cloud = _TerminateFails(rt.cloud)  # ... and the cloud cannot terminate
        monkeypatch.setattr(gateway_loop, "AUTH_WINDOW_S", 0.5)  # the hold is short here
        run_out_of_paid_time(g, job_id)
        wait_for(lambda: _state(g, job_id) == ("ending", "expired"), 60)
        # The renewal had settled after all; the ledger answers again and it is booked while
        # the job's instance is still being terminated.
        assert facilitator.release(g.world.facilitator.url) == 1
        ledger.down = False
        wait_for(lambda: pending(g) == [], 60)
        assert [t["value"] for t in paid_out(g)] == [
            usd_to_micros(q1["amount"]),
            usd_to_micros(q2["amount"]),
        ]
        cloud.failing = False
        # The time it paid for is given: the job runs again, from its last checkpoint.
        wait_for(lambda: _state(g, job_id)[0] in ("running", "expired"), 60)
        shown = job_status(g, job_id)
        assert shown["status"] == "running", (shown["paidHours"], shown["logs"][-6:])
        assert shown["paidHours"] == pytest.approx(q1["hours"] + q2["hours"])
        assert any("resuming from" in line for line in shown["logs"]), shown["logs"]
        assert len(g.live_pods()) == 1
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


def test_a_renewal_booked_after_its_job_failed_to_launch_in_its_paid_time_gives_that_time(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a job waiting for capacity was renewed (to wait longer), the renewal's
    settle answer lost and the ledger down through its hold: it ended `failed` ("no instance
    could be launched within the paid time"), and the renewal, booked when the ledger answered
    again, added hours to the failed job: the buyer's money taken, no launch ever tried again."""
    clients: list[FlakySettle] = []
    monkeypatch.setattr(gateway_serve, "facilitator_client", flaky_client(clients))
    g = start_gateway_world(
        tmp_path, sqlite_url, command=(sys.executable, TRAIN, *_steps(4000)), launch_retry_s=1.0
    )
    try:
        facilitator = clients[0]
        rt = g.server.app.state.runtime
        rt.cloud = cloud = _NoCapacity(rt.cloud)  # sold, then every launch refused
        account = buyer(g, "waiter")
        q1 = quote(g)
        first = submit(g, "waiting", q1)
        paid = submit(
            g, "waiting", q1, signed_payment(g, first.headers["PAYMENT-REQUIRED"], account, nonce())
        )
        assert paid.status_code == 200, paid.text
        job_id = paid.json()["jobId"]
        wait_for(lambda: "refused" in (job_status(g, job_id).get("logs") or [""])[-1], 60)
        facilitator.mode = "held"  # the renewal's settle answer never comes
        rt.ledger = ledger = _Ledger(rt.ledger)  # ... and the ledger cannot say
        q2, _, _ = renew_in_doubt(g, job_id, account)
        monkeypatch.setattr(gateway_loop, "AUTH_WINDOW_S", 0.5)  # the hold is short here
        with g.store.session() as s:  # its paid time (to launch in) ends as the renewal is made
            row = s.get(GatewayJobRow, job_id)
            renewal = book.renewal_in_doubt(s, job_id, utcnow() - timedelta(hours=1), utcnow())
            assert row is not None and renewal is not None and row.paid_until is None
            row.created_at = renewal.created_at - timedelta(seconds=row.paid_hours * g.cfg.hour_s)
        wait_for(lambda: _state(g, job_id)[0] == "failed", 60)
        assert facilitator.release(g.world.facilitator.url) == 1
        ledger.down = False
        wait_for(lambda: pending(g) == [], 60)
        assert [t["value"] for t in paid_out(g)] == [
            usd_to_micros(q1["amount"]),
            usd_to_micros(q2["amount"]),
        ]
        cloud.full = False  # capacity comes back
        # The time it paid for is given: the job is launched and runs.
        wait_for(lambda: _state(g, job_id)[0] in ("running", "failed"), 30)
        shown = job_status(g, job_id)
        assert shown["status"] == "running", (shown["paidHours"], shown["logs"][-4:])
        assert shown["paidHours"] == pytest.approx(q1["hours"] + q2["hours"])
        httpx.post(f"{g.url}/cancel-job", json={"jobId": job_id}, headers=g.headers())
        wait_for(lambda: g.live_pods() == [], 60)
    finally:
        g.stop()


# --- 4. quotes and the cloud's rate limits ----------------------------------------------------


class _SlowCatalogue:
    """The mock RunPod, its whole catalogue (`offers()`, what quotes read) slow to answer, and
    each such read counted."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.reads = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def offers(self, **kwargs: Any) -> list[Any]:
        if not kwargs:
            self.reads += 1
            await asyncio.sleep(0.5)
        return list(await self.inner.offers(**kwargs))


def test_quotes_asked_together_read_the_clouds_catalogue_once(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld]
) -> None:
    """Before the fix: the quotes' catalogue was cached only once the cloud had answered, so
    every quote asked while it was being read (at start, or each time it went stale) read it
    again: 40 quotes asked together were 40 calls on the operator's cloud account, whose rate
    limits its launches and terminates share (the docs promise at most one call per 5 s)."""
    g = start_gateway_world(tmp_path, sqlite_url)
    started.append(g)
    rt = g.server.app.state.runtime
    rt.cloud = cloud = _SlowCatalogue(rt.cloud)

    assert g.quotes_together(40) == [200] * 40
    assert cloud.reads == 1, f"{cloud.reads} catalogue reads for 40 quotes asked together"


# --- 5. ids no store can hold -----------------------------------------------------------------

# A JSON string may escape half of a UTF-16 pair: Python reads it as a lone surrogate, which
# neither SQLite nor PostgreSQL can be sent (it is not UTF-8).
LONE = "\\ud800"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/cancel-job", f'{{"jobId": "{LONE}"}}'),
        ("/quote", f'{{"gpuType": "RTX4090", "hours": 1, "jobId": "{LONE}"}}'),
        ("/renew-job", f'{{"jobId": "{LONE}", "quoteId": "q"}}'),
    ],
    ids=["cancel", "quote-for-a-job", "renew"],
)
def test_an_id_with_half_a_surrogate_pair_is_an_unknown_id_not_a_server_error(
    tmp_path: Path, sqlite_url: str, started: list[GatewayWorld], path: str, body: str
) -> None:
    """Before the fix: a job id sent as `"\\ud800"` (half a UTF-16 surrogate pair, which JSON
    allows) reached the store, which cannot encode it: the buyer got a 500 and the gateway's log
    a database traceback, as a NUL did before `book.known` refused it."""
    g = start_gateway_world(tmp_path, sqlite_url)
    started.append(g)
    headers = {**g.headers("surrogate-key", "q"), "Content-Type": "application/json"}
    answer = httpx.post(f"{g.url}{path}", content=body.encode(), headers=headers, timeout=15)
    assert answer.status_code < 500, answer.text
    assert answer.status_code != 200 or "quoteId" in answer.json(), answer.text
