"""The API's limits: job specs that make no sense are a 422 (never a 500), budgets never round
up, every error is in the `{"error": ...}` envelope, /openapi.json states the limits in standard
JSON Schema, long observation histories come in pages, and an API tick that crashed holds its
run for the short API lease only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.api.app import create_app
from procure.local import free_port, serve
from procure.models import JobSpec, ObservationType, Vendor, budget_to_micros, usd_to_micros
from procure.settings import Settings
from procure.store import Store, leases, open_store, repo


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = open_store(db_url)
    yield store
    store.dispose()


@contextmanager
def _client(tmp_path: Path, db_url: str, store: Store, **env: Any) -> Iterator[httpx.Client]:
    settings = Settings(PROCURE_DATABASE_URL=db_url, PROCURE_HOME=tmp_path, **env)
    server = serve(create_app(settings, store))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client
    finally:
        server.stop()


@pytest.fixture
def api(tmp_path: Path, db_url: str, store: Store) -> Iterator[httpx.Client]:
    """The API on each backend (for what touches the store)."""
    with _client(tmp_path, db_url, store, PROCURE_API_TOKEN="s3cret") as client:
        yield client


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One API on SQLite for the whole module (for validation, which no backend changes)."""
    tmp = tmp_path_factory.mktemp("checks")
    url = f"sqlite:///{tmp / 'procure.db'}"
    store = open_store(url)
    with _client(tmp, url, store, PROCURE_API_TOKEN="s3cret") as client:
        yield client
    store.dispose()


AUTH = {"Authorization": "Bearer s3cret"}
GOOD = {"userId": "u1", "goal": "Fine-tune", "budgetTotal": 5}


def _start(api: httpx.Client, **body: Any) -> httpx.Response:
    return api.post("/api/agent-start", json={**GOOD, **body}, headers=AUTH)


# --- job specs, deadlines and budgets ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"deadline": "9999-12-31T23:59:59-12:00"}, "deadline"),  # past year 9999 in UTC
        ({"deadline": "0001-01-01T00:00:00+14:00"}, "deadline"),  # before year 1 in UTC
        ({"deadline": "9999-12-31T23:59:59Z"}, "five years"),
        ({"deadline": "2001-01-01T00:00:00Z"}, "in the future"),
        ({"deadline": "2020-06-01T00:00:00"}, "in the future"),
        ({"deadline": "not a time"}, "deadline"),
        ({"deadlineHours": 1e300}, "deadlineHours"),
        ({"deadlineHours": 0}, "deadlineHours"),
        ({"deadlineHours": -1}, "deadlineHours"),
        ({"budgetTotal": 1e308}, "budgetTotal"),
        ({"budgetTotal": 1_000_000.5}, "budgetTotal"),
        ({"budgetTotal": 10**400}, "budgetTotal"),
        ({"budgetTotal": 1e-7}, "budgetTotal"),  # rounds down to nothing
        ({"budgetTotal": 0.0000009}, "budgetTotal"),
        ({"hours": 1e-7}, "hours"),  # once a run that answered "Quote rejected" forever
        ({"hours": 1 / 61}, "hours: Input should be at least 1 minute (0.0167 hours)"),
        ({"hours": 1e9}, "hours"),
        ({"hours": -1}, "hours"),
        ({"checkpointEvery": 1e-300}, "checkpointEvery"),  # once a vendor spinning at full CPU
        ({"checkpointEvery": 0.009}, "checkpointEvery"),
        ({"checkpointEvery": 1.5}, "checkpointEvery"),
        ({"epochs": 10**30}, "epochs"),
        ({"gpuType": ""}, "gpuType"),
        ({"gpuType": "A" * 1000}, "gpuType"),
        ({"userId": "u" * 201}, "userId"),
    ],
)
def test_nonsense_job_specs_are_a_422(checks: httpx.Client, body: dict, mentions: str) -> None:
    response = _start(checks, **body)
    assert response.status_code == 422, response.text
    assert mentions in response.json()["error"]


@pytest.mark.parametrize("constant", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
def test_infinite_and_nan_budgets_are_a_422(checks: httpx.Client, constant: bytes) -> None:
    # Python's JSON parser accepts these; the schema must not.
    body = b'{"userId": "u", "goal": "g", "budgetTotal": %s}' % constant
    response = checks.post(
        "/api/agent-start",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert "budgetTotal" in response.json()["error"]


def test_the_limits_themselves_are_accepted(checks: httpx.Client) -> None:
    edge = _start(
        checks,
        budgetTotal=1_000_000,
        hours=1 / 60,
        checkpointEvery=0.01,
        deadlineHours=24 * 365 * 5,
        epochs=1000,
    )
    assert edge.status_code == 201, edge.text
    assert _start(checks, budgetTotal=0.000001, hours=720, checkpointEvery=1).status_code == 201
    soon = _start(checks, deadline="2099-01-01T00:00:00Z")
    assert soon.status_code == 422  # more than five years ahead
    when = (datetime.now(UTC) + timedelta(days=200)).replace(hour=12, minute=0, microsecond=0)
    later = _start(checks, deadline=when.replace(tzinfo=None).isoformat() + "+02:00")
    assert later.status_code == 201, later.text
    stored = datetime.fromisoformat(later.json()["deadline"])
    assert stored == when - timedelta(hours=2)  # stored in UTC


@pytest.mark.parametrize(
    ("given", "stored"),
    [(4.9999995, 4.999999), (4.9999999, 4.999999), (0.0000019, 0.000001), (5.25, 5.25)],
)
def test_budgets_never_round_up(checks: httpx.Client, given: float, stored: float) -> None:
    run = _start(checks, budgetTotal=given)
    assert run.status_code == 201, run.text
    assert run.json()["budgetTotal"] == stored
    assert run.json()["budgetRemaining"] == stored


def test_budget_to_micros_floors_and_usd_to_micros_still_rounds_half_up() -> None:
    assert budget_to_micros(4.9999995) == 4_999_999
    assert budget_to_micros("4.9999995") == 4_999_999
    assert budget_to_micros(5) == 5_000_000
    assert budget_to_micros(0.1 + 0.2) == 300_000  # 0.30000000000000004
    assert usd_to_micros(4.9999995) == 5_000_000  # amounts owed keep rounding half up


# --- one error envelope --------------------------------------------------------------------


def test_every_error_uses_the_error_envelope(checks: httpx.Client) -> None:
    answers = {
        "unknown route": checks.get("/no/such/route"),
        "unknown api route": checks.post("/api/nothing", json={}),
        "wrong method": checks.delete("/api/agent-start"),
        "wrong method on a read": checks.post("/healthz"),
        "no token": checks.post("/api/agent-start", json=GOOD),
        "unknown run": checks.get("/api/runs/nope", headers=AUTH),
        "unknown run (seeds)": checks.get(
            "/api/agent-status", params={"runId": "nope"}, headers=AUTH
        ),
        "unknown run tick": checks.post("/api/agent-tick", json={"runId": "nope"}, headers=AUTH),
        "invalid": _start(checks, budgetTotal="five"),
        "not json": checks.post("/api/agent-start", content=b"{", headers=AUTH),
        "bad query": checks.get("/api/runs", params={"limit": "many"}, headers=AUTH),
    }
    for name, answer in answers.items():
        assert 400 <= answer.status_code < 500, (name, answer.status_code, answer.text)
        body = answer.json()
        assert isinstance(body.get("error"), str) and body["error"], (name, body)
        assert "detail" not in body, (name, body)
    assert answers["unknown route"].status_code == 404
    assert "/no/such/route" in answers["unknown route"].json()["error"]
    assert answers["wrong method"].status_code == 405
    assert answers["wrong method"].headers["allow"] == "POST"
    assert "DELETE" in answers["wrong method"].json()["error"]
    assert answers["no token"].status_code == 401


def test_openapi_states_limits_in_standard_json_schema(checks: httpx.Client) -> None:
    document = checks.get("/openapi.json").json()

    def keys(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)
        elif isinstance(node, list):
            for value in node:
                yield from keys(value)

    used = set(keys(document["paths"])) | set(keys(document["components"]))
    assert not used & {"gt", "ge", "lt", "le", "max_length", "min_length", "allow_inf_nan"}

    fields = document["components"]["schemas"]["StartRequest"]["properties"]
    assert fields["budgetTotal"]["type"] == "number"
    assert fields["budgetTotal"]["minimum"] == 0.000001
    assert fields["budgetTotal"]["maximum"] == 1_000_000
    assert fields["hours"]["minimum"] == pytest.approx(1 / 60)
    assert fields["hours"]["maximum"] == 720
    checkpoint = next(s for s in fields["checkpointEvery"]["anyOf"] if s["type"] == "number")
    assert checkpoint["minimum"] == 0.01 and checkpoint["maximum"] == 1
    deadline_hours = next(s for s in fields["deadlineHours"]["anyOf"] if s["type"] == "number")
    assert deadline_hours["exclusiveMinimum"] == 0 and deadline_hours["maximum"] == 43_800
    assert fields["userId"]["maxLength"] == 200 and fields["goal"]["maxLength"] == 2000
    params = {
        p["name"]: p["schema"] for p in document["paths"]["/api/agent-status"]["get"]["parameters"]
    }
    assert params["observationsLimit"] == {**params["observationsLimit"], "maximum": 5000}
    assert params["observationsLimit"]["minimum"] == 1
    assert params["observationsAfter"]["minimum"] == 0
    # Its 422 answers are described as what is sent: the envelope.
    error = document["components"]["schemas"]["HTTPValidationError"]
    assert error["required"] == ["error"]


def test_nul_characters_are_a_422_on_every_backend(api: httpx.Client) -> None:
    """PostgreSQL can neither store nor compare text with NUL (the fuzzer found it)."""
    answers = [
        _start(api, goal="a\x00b"),
        _start(api, userId="\x00"),
        api.post("/api/agent-tick", json={"runId": "r\x00"}, headers=AUTH),
        api.get("/api/agent-status", params={"runId": "r\x00"}, headers=AUTH),
        api.get("/api/runs/r%00", headers=AUTH),
    ]
    for answer in answers:
        assert answer.status_code == 422, (answer.request.url, answer.text)
        assert "error" in answer.json()
    assert "NUL" in answers[0].json()["error"]
    # Anywhere validation would let one through, the store's refusal is a 422 too, not a 500.
    listed = api.get("/api/runs", params={"status": "running\x00"}, headers=AUTH)
    assert listed.status_code in (200, 422), listed.text
    if listed.status_code == 422:
        assert "NUL" in listed.json()["error"]


# --- pages of observations -----------------------------------------------------------------


def _run_with_observations(store: Store, count: int) -> tuple[str, list[int]]:
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=5_000_000, job_spec=JobSpec()
        ).id
        other = repo.create_run(
            s, user_id="u", goal="g", budget_total=5_000_000, job_spec=JobSpec()
        )
    with store.session() as s:
        for i in range(count):
            repo.add_observation(s, run_id, ObservationType.job_log, f"line {i}")
            if i % 100 == 0:  # another run's observations interleave with this one's
                repo.add_observation(s, other.id, ObservationType.job_log, "elsewhere")
    with store.session() as s:
        ids = [o.id for o in repo.list_observations(s, run_id)]
    assert len(ids) == count
    return run_id, ids


@pytest.mark.parametrize("seeds", [True, False], ids=["agent-status", "runs"])
def test_observations_come_in_pages(api: httpx.Client, store: Store, seeds: bool) -> None:
    run_id, ids = _run_with_observations(store, 2345)
    url, where = ("/api/agent-status", {"runId": run_id}) if seeds else (f"/api/runs/{run_id}", {})
    first = api.get(url, params=where, headers=AUTH).json()
    assert set(first) == {"run", "jobs", "payments", "observations", "observationsNext"}
    assert len(first["observations"]) == 1000  # the default page
    assert first["observationsNext"] == ids[999]

    seen: list[int] = []
    cursor: int | None = 0
    pages = 0
    while cursor is not None:
        page = api.get(
            url,
            params={**where, "observationsAfter": cursor, "observationsLimit": 700},
            headers=AUTH,
        )
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["observations"]) <= 700
        assert all(o["runId"] == run_id for o in body["observations"])
        seen += [o["_id"] for o in body["observations"]]
        cursor = body["observationsNext"]
        pages += 1
    assert seen == ids and pages == 4  # 700 + 700 + 700 + 245, in order, none twice
    whole = api.get(url, params={**where, "observationsLimit": 5000}, headers=AUTH).json()
    assert whole["observationsNext"] is None and len(whole["observations"]) == 2345
    past_the_end = api.get(url, params={**where, "observationsAfter": ids[-1]}, headers=AUTH).json()
    assert past_the_end["observations"] == [] and past_the_end["observationsNext"] is None


def test_a_page_that_ends_exactly_at_the_last_observation_says_so(
    api: httpx.Client, store: Store
) -> None:
    run_id, ids = _run_with_observations(store, 10)
    exact = api.get(
        "/api/agent-status", params={"runId": run_id, "observationsLimit": 10}, headers=AUTH
    )
    assert exact.json()["observationsNext"] is None
    short = api.get(
        "/api/agent-status", params={"runId": run_id, "observationsLimit": 9}, headers=AUTH
    )
    assert short.json()["observationsNext"] == ids[8]


@pytest.mark.parametrize(
    "params",
    [
        {"observationsLimit": 0},
        {"observationsLimit": 5001},
        {"observationsLimit": "all"},
        {"observationsAfter": -1},
        {"observationsAfter": 2**64},
    ],
)
def test_bad_page_parameters_are_a_422(api: httpx.Client, store: Store, params: dict) -> None:
    run_id, _ = _run_with_observations(store, 1)
    for url in ("/api/agent-status", f"/api/runs/{run_id}"):
        answer = api.get(url, params={"runId": run_id, **params}, headers=AUTH)
        assert answer.status_code == 422, answer.text
        assert "observations" in answer.json()["error"]


# --- the API's tick lease ------------------------------------------------------------------


def test_the_api_lease_is_short_by_default() -> None:
    assert Settings().api_lease_s == 15
    assert Settings(PROCURE_API_LEASE_S="1").api_lease_s == 1


def test_a_lease_left_by_a_crashed_api_tick_frees_the_run_after_the_api_lease(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    with store.session() as s:
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=5_000_000, job_spec=JobSpec()
        ).id
    with _client(tmp_path, db_url, store, PROCURE_API_LEASE_S="5") as api:
        # What an API tick killed mid-way leaves: its lease, taken once the API is up (a slow
        # start on a busy machine must not outlast it before the first request).
        with store.session() as s:
            assert leases.acquire(s, run_id, "api-crashed", 5.0)
        held = api.post("/api/agent-tick", json={"runId": run_id})
        assert held.status_code == 409 and held.json()["holder"] == "api-crashed"
        deadline = time.monotonic() + 60
        while (freed := api.post("/api/agent-tick", json={"runId": run_id})).status_code == 409:
            assert time.monotonic() < deadline, "the crashed tick's lease never lapsed"
            time.sleep(0.5)
        assert freed.status_code == 200, freed.text


def _silent_vendor() -> socket.socket:
    """A vendor that accepts connections (the kernel does, from the backlog) and never
    answers: a tick asking it for a quote hangs until the vendor timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _serve(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`procure serve` started (not yet up: see `_up`), and its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", "serve", "--no-worker", "--port", str(port)],
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _up(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Wait until the server answers /healthz (Python's start: seconds on a busy machine)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"procure serve did not start:\n{log.read_text()}")


def test_a_killed_api_tick_holds_its_run_for_the_short_lease_only(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Two API servers on one store: A a `procure serve` process, B one in this process (the
    same app; it is never killed, and so pays no second Python start). A's tick hangs on a
    silent vendor, its heartbeat keeping the lease past its TTL (B gets 409s: invariant 4); A
    is killed -9 in the middle of the tick; B can tick the run within about one lease, not
    120 s."""
    lease_s = 2.0
    vendor = _silent_vendor()
    store = open_store(sqlite_url)
    with store.session() as s:
        repo.save_vendor(
            s,
            Vendor(
                vendor_id="silent",
                name="Silent",
                endpoint=f"http://127.0.0.1:{vendor.getsockname()[1]}",
                base_price_per_hour=1_000_000,
                reliability_score=0.9,
                supported_gpu_types=["A100"],
            ),
        )
        run_id = repo.create_run(
            s, user_id="u", goal="g", budget_total=5_000_000, job_spec=JobSpec()
        ).id
    env = {
        "PROCURE_API_LEASE_S": str(lease_s),
        "VENDOR_TIMEOUT_S": "120",
        "X402_FACILITATOR_URL": f"http://127.0.0.1:{free_port()}",
    }
    a_home = {"PROCURE_DATABASE_URL": sqlite_url, "PROCURE_HOME": str(tmp_path / "a")}
    a, a_url = _serve({**env, **a_home}, tmp_path / "a.log")
    try:
        # B's home is its own: two processes making one fresh home's wallet at once race.
        with _client(tmp_path / "b", sqlite_url, store, **env) as b:
            _up(a, a_url, tmp_path / "a.log")
            _hold_then_kill(a, a_url, b, store, run_id, vendor, lease_s)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(timeout=10)
        vendor.close()
        store.dispose()


def _hold_then_kill(
    a: subprocess.Popen[bytes],
    a_url: str,
    b: httpx.Client,
    store: Store,
    run_id: str,
    vendor: socket.socket,
    lease_s: float,
) -> None:
    """A ticks (and hangs), B is refused while A lives, A is killed, B ticks within a lease."""
    hung = threading.Thread(
        target=lambda: _ignore(
            lambda: httpx.post(f"{a_url}/api/agent-tick", json={"runId": run_id}, timeout=60)
        ),
        daemon=True,
    )
    hung.start()
    deadline = time.monotonic() + 20
    while True:
        with store.session() as s:
            holder = leases.holder(s, run_id)
        if holder and holder.startswith("api-"):
            break
        assert time.monotonic() < deadline, "A never took the lease"
        time.sleep(0.05)
    # Held past its TTL by A's heartbeat while A's tick is alive.
    until = time.monotonic() + 2.5 * lease_s
    while time.monotonic() < until:
        answer = b.post("/api/agent-tick", json={"runId": run_id}, timeout=10)
        assert answer.status_code == 409, answer.text
        assert answer.json()["holder"] == holder
        time.sleep(0.3)

    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    killed = time.monotonic()
    vendor.close()  # the next tick's quote is refused at once instead of hanging
    while True:
        answer = b.post("/api/agent-tick", json={"runId": run_id}, timeout=30)
        if answer.status_code != 409:
            break
        assert time.monotonic() - killed < lease_s + 5, "the run stayed held too long"
        time.sleep(0.1)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - killed < lease_s + 5


def _ignore(call: Any) -> None:
    with suppress(httpx.HTTPError):
        call()
