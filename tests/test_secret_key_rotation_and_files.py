"""The deployment's key (PROCURE_SECRET_KEY or PROCURE_HOME/secret.key) and the vendor credentials
sealed with it: switching to the variable, rotating, a first start killed mid-way; and the wallet
command never printing the facilitator URL's password."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from procure.api.app import create_app
from procure.local import LocalServer, serve
from procure.models import JobSpec
from procure.settings import Settings
from procure.store import open_store, repo
from procure.vendors.client import VendorClient, VendorError
from procure.vendors.credentials import KEY_ENV, KEY_FILE, Keyring

OWN = "acme-token-0123456789"


class Vendor:
    """A loopback vendor that records the Authorization header of every request."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def anything(path: str, request: Request) -> JSONResponse:
            self.authorizations.append(request.headers.get("authorization"))
            return JSONResponse({"error": "down"}, status_code=503)

        self.server: LocalServer = serve(app)


@pytest.fixture
def vendor() -> Iterator[Vendor]:
    v = Vendor()
    yield v
    v.server.stop()


def _register(home: Path, url: str, endpoint: str) -> None:
    """PUT a vendor with its own credential through the real API (which seals it)."""
    store = open_store(url)
    server = serve(create_app(Settings(PROCURE_DATABASE_URL=url, PROCURE_HOME=home), store))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            answer = api.put(
                "/api/vendors/acme",
                json={
                    "vendorId": "acme",
                    "name": "Acme",
                    "endpoint": endpoint,
                    "basePricePerHour": 0.5,
                    "reliabilityScore": 0.9,
                    "supportedGpuTypes": ["A100"],
                    "credential": OWN,
                },
            )
            assert answer.status_code == 200, answer.text
    finally:
        server.stop()


def _sent_by_worker(home: Path, url: str, vendor: Vendor) -> str | None:
    """What a worker started now (its key as `Keyring.load` finds it) sends the vendor."""
    store = open_store(url)
    with store.session() as s:
        stored = repo.get_vendor(s, "acme")
    assert stored is not None and stored.has_credential

    async def quote() -> None:
        client = VendorClient(Keyring.load(home), timeout_s=10)
        try:
            with pytest.raises(VendorError):
                await client.quote(stored, JobSpec(gpu_type="A100", hours=1))
        finally:
            await client.aclose()

    asyncio.run(quote())
    return vendor.authorizations[-1]


def test_setting_procure_secret_key_later_keeps_the_credentials_stored_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vendor: Vendor
) -> None:
    """Before the fix: a deployment that began with PROCURE_HOME/secret.key and then set
    PROCURE_SECRET_KEY (as the README says to, for several hosts) could open none of its stored
    credentials (nor running instances' node tokens): vendors got no credential at all."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.delenv(KEY_ENV, raising=False)
    home, url = tmp_path / "home", f"sqlite:///{tmp_path / 'procure.db'}"
    _register(home, url, vendor.server.url)
    assert (home / KEY_FILE).exists()
    assert _sent_by_worker(home, url, vendor) == f"Bearer {OWN}"

    new = Fernet.generate_key().decode()
    monkeypatch.setenv(KEY_ENV, new)
    assert _sent_by_worker(home, url, vendor) == f"Bearer {OWN}"
    # New credentials are sealed with the variable's key: another host without the file opens them.
    sealed = Keyring.load(home).encrypt("fresh")
    assert Keyring.load(tmp_path / "other-host").decrypt(sealed) == "fresh"


def test_a_new_procure_secret_key_listing_the_old_one_keeps_stored_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vendor: Vendor
) -> None:
    """Before the fix: there was no way to rotate PROCURE_SECRET_KEY: `NEW,OLD` was refused as
    not a Fernet key, and NEW alone lost every credential stored under OLD."""
    monkeypatch.chdir(tmp_path)
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv(KEY_ENV, old)
    home, url = tmp_path / "home", f"sqlite:///{tmp_path / 'procure.db'}"
    _register(home, url, vendor.server.url)

    monkeypatch.setenv(KEY_ENV, f"{new},{old}")
    assert _sent_by_worker(home, url, vendor) == f"Bearer {OWN}"
    sealed = Keyring.load(home).encrypt("fresh")
    assert Keyring(new).decrypt(sealed) == "fresh"  # sealed with the first, current key


_CRASH_WHILE_MAKING_THE_KEY = textwrap.dedent(
    """
    import os, signal, sys
    from procure.vendors import credentials

    def crash(*args, **kwargs):  # killed once the key's file exists, before its key is in it
        os.kill(os.getpid(), signal.SIGKILL)
    os.fdopen = crash
    credentials.Keyring.load(sys.argv[1])
    """
)


def test_a_first_start_killed_while_making_the_key_does_not_brick_the_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the fix: a process killed between creating PROCURE_HOME/secret.key and writing
    the key left it empty; every later process (API, worker, CLI) then refused to start with
    "not a Fernet key" until someone deleted the file by hand. (A second process starting at
    the same moment read it empty the same way.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(KEY_ENV, raising=False)
    home = tmp_path / "home"
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_WHILE_MAKING_THE_KEY, str(home)],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == -9, child.stderr.decode()
    keyring = Keyring.load(home)
    assert keyring.decrypt(keyring.encrypt("s3cret")) == "s3cret"
    assert Keyring.load(home).decrypt(keyring.encrypt("again")) == "again"  # the same key


PASSWORD = "fac1l1tat0r-pw-0123"


@pytest.fixture
def facilitator() -> Iterator[LocalServer]:
    """A loopback facilitator behind basic auth: answers one balance, then is down."""
    app = FastAPI()
    answered: list[str] = []

    @app.get("/balance/{address}")
    async def balance(address: str) -> JSONResponse:
        if answered:
            return JSONResponse({"error": "down"}, status_code=503)
        answered.append(address)
        return JSONResponse({"address": address, "balance": "12.5"})

    server = serve(app)
    yield server
    server.stop()


def test_procure_wallet_never_prints_the_facilitator_urls_password(
    tmp_path: Path, facilitator: LocalServer
) -> None:
    """Before the fix: `procure wallet` printed X402_FACILITATOR_URL as given, password and all
    (`http://user:PASSWORD@host`), in its answer, its --json and its error when the
    facilitator did not answer: into terminals, CI logs and pasted bug reports."""
    url = facilitator.url.replace("://", f"://procure:{PASSWORD}@")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCURE_", "X402"))}
    env.update(X402_FACILITATOR_URL=url, PROCURE_HOME=str(tmp_path / "home"), COLUMNS="200")
    outputs = []
    for args in (["--json"], []):  # the first answers, the second meets a 503
        done = subprocess.run(
            [sys.executable, "-m", "procure.cli", "wallet", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        outputs.append((done.returncode, done.stdout + done.stderr))
    (ok, shown), (failed, error) = outputs
    assert ok == 0 and "12.5" in shown, shown
    assert failed != 0 and "503" in error, error
    for text in (shown, error):
        assert PASSWORD not in text
        assert "***@127.0.0.1" in text  # which facilitator is still said


@pytest.mark.parametrize(
    "make",
    [
        "from procure.payments.wallet import load_or_create_account as f; "
        "at_once(); print(f(None, home).address)",
        "from procure.gateway.settings import load_node_key as f; at_once(); print(f(home))",
    ],
    ids=["wallet", "gateway-node-key"],
)
def test_processes_starting_on_a_new_home_at_once_share_one_key(tmp_path: Path, make: str) -> None:
    """Before the fix: the wallet's key and the gateway's node key were created, then written;
    a second process starting at that moment (two `procure serve`, or serve and a worker, on a
    new home) read the file empty and died ("private key must be exactly 32 bytes")."""
    # Four processes race on a new home `attempts` times: each imports once (an interpreter
    # and eth_account per race made this test slow), then for each new home says it is ready
    # and waits for the go, so that the four ask together. 40 races: one in 8 to one in 2 of
    # them caught the bug (checked with the loaders as they were before the fix).
    attempts = 40
    script = (
        textwrap.dedent(
            """
        import os, sys, time
        from pathlib import Path
        root, attempts = Path(sys.argv[1]), int(sys.argv[2])
        def at_once():
            (gate / f"ready-{os.getpid()}").touch()
            while not (gate / "go").exists():
                time.sleep(0.0005)
        for attempt in range(attempts):
            home, gate = root / f"home-{attempt}", root / f"gate-{attempt}"
        """
        )
        + "    "
        + make
        + "; sys.stdout.flush()\n"
    )
    for attempt in range(attempts):
        (tmp_path / f"gate-{attempt}").mkdir()
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(attempts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    deadline = time.monotonic() + 120
    for attempt in range(attempts):
        gate = tmp_path / f"gate-{attempt}"
        # A process that died (the bug) never says it is ready again: go on without it.
        while (
            len(list(gate.glob("ready-*"))) < 4
            and all(p.poll() is None for p in starts)
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        (gate / "go").touch()
    said = [p.communicate(timeout=120) for p in starts]
    assert [p.returncode for p in starts] == [0] * 4, [err[-300:] for _, err in said]
    keys = [out.split() for out, _ in said]
    assert all(len(made) == attempts for made in keys), keys
    for attempt in range(attempts):
        assert len({made[attempt] for made in keys}) == 1  # one key per home, whoever made it
