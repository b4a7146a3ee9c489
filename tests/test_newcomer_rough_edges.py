"""What a newcomer following the README tripped on: a vendor registered without its network and
asset (the operator's mistake, said with what to do, not held against the vendor), a mock vendor
without its facilitator, busy ports said before any side effect, mock-cloud options that would be
silently ignored, help that hides its defaults, "not found" that says where the ids are, and log
lines that alarm or say nothing."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import cli_run
from cli_run import cli_env, one_line
from procure.local import LocalServer, free_port, start_facilitator, start_mock_vendor

SECRET = "rough-edges-secret"


def _env(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    return cli_env(tmp_path, {"GPU_VENDOR_SECRET": SECRET, **extra})


def procure(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return cli_run.procure(tmp_path, *args, **{"GPU_VENDOR_SECRET": SECRET, **extra})


@pytest.fixture
def facilitator(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_facilitator(tmp_path / "chain.json")
    yield server
    server.stop()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        yield int(held.getsockname()[1])


# 1. A vendor registered without network and asset


def _seeded_mock_vendors(
    tmp_path: Path, facilitator: LocalServer
) -> tuple[list[LocalServer], dict[str, str]]:
    """The seeds' two vendors, served on loopback, registered as `procure vendors seed` does and
    the wallet funded as `procure wallet --fund 50` does, in this process: two `procure` starts
    (seconds each on a busy machine) that the tests below do not look at (those commands have
    their own tests in tests/test_first_hour_cli.py and tests/test_wallet.py)."""
    from procure.local import mock_vendor_config
    from procure.models import usd_to_micros
    from procure.payments.wallet import load_or_create_account
    from procure.store import open_store, repo
    from procure.vendors.credentials import Keyring
    from procure.vendors.registry import default_vendors

    ports = (free_port(), free_port())
    servers = [
        start_mock_vendor(
            mock_vendor_config(v, facilitator.url, SECRET, job_seconds=30), facilitator.url, port
        )
        for v, port in zip(default_vendors(ports=ports), ports, strict=True)
    ]
    chain = facilitator.app.state.chain
    home = tmp_path / "home"  # cli_env's PROCURE_HOME: its secret.key and wallet
    credential = Keyring.load(home).encrypt(SECRET)
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")  # cli_env's PROCURE_DATABASE_URL
    try:
        with store.session() as s:
            for vendor in default_vendors(
                host="http://127.0.0.1",
                ports=ports,
                network=chain.network,
                asset=chain.token_address,
                credential=credential,
            ):
                repo.save_vendor(s, vendor)
    finally:
        store.dispose()
    chain.mint(load_or_create_account(None, home).address, usd_to_micros(50))
    return servers, {"X402_FACILITATOR_URL": facilitator.url}


def test_a_vendor_registered_without_its_asset_is_the_operators_mistake(
    tmp_path: Path, facilitator: LocalServer
) -> None:
    """Before the fix: the README's PUT (no network, no asset) left a vendor whose every payment
    was refused with "the vendor registry has no asset for this vendor: it cannot be paid" (no
    word on what to do), and each refusal counted as the vendor's failure, for the operator's
    mistake."""
    from procure.store import open_store, repo

    servers, env = _seeded_mock_vendors(tmp_path, facilitator)
    try:
        store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
        with store.session() as s:  # as a registration that left them out leaves them
            for vendor in repo.list_vendors(s):
                repo.save_vendor(s, vendor.model_copy(update={"network": None, "asset": None}))
        store.dispose()
        started = procure(tmp_path, "run", "start", "--goal", "g", "--budget", "5", **env)
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["_id"]
        ticked = procure(tmp_path, "run", "tick", run_id, **env)
        assert ticked.returncode == 0, ticked.stderr
        status = json.loads(procure(tmp_path, "run", "status", run_id, **env).stdout)
        refused = [o["content"] for o in status["observations"] if "cannot be paid" in o["content"]]
        assert refused, status["observations"]
        assert "Register it again with payTo, network and asset" in refused[0]
        assert "procure vendors list --json" in refused[0]
        vendors = json.loads(procure(tmp_path, "vendors", "list", "--json", **env).stdout)
        assert [v["failures"] for v in vendors] == [0, 0], vendors
    finally:
        for server in servers:
            server.stop()


# 2. `procure mock-vendor` without a facilitator


def test_a_mock_vendor_without_its_facilitator_isone_line(tmp_path: Path) -> None:
    """Before the fix: a 38-line traceback ending in RuntimeError."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = procure(
        tmp_path,
        "mock-vendor",
        "--vendor-id",
        "gpu_vendor_1",
        "--port",
        str(free_port()),
        X402_FACILITATOR_URL=nowhere,
    )
    line = one_line(result, naming=nowhere)
    assert "procure facilitator" in line


def test_mock_vendor_help_names_its_job_seconds_default() -> None:
    """Before the fix: MOCK_JOB_SECONDS was honoured but not named, --job-seconds had no
    default shown."""
    result = subprocess.run(
        [sys.executable, "-m", "procure.cli", "mock-vendor", "--help"],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "FAIL_AT and MOCK_JOB_SECONDS" in text
    assert "(default: MOCK_JOB_SECONDS, else 6)" in text


# 3. Busy ports: said first, before any side effect


def test_a_facilitator_on_a_busy_port_funds_nothing(tmp_path: Path, busy_port: int) -> None:
    """Before the fix: it funded the wallet and wrote its chain journal, then uvicorn failed to
    bind."""
    result = procure(tmp_path, "facilitator", "--port", str(busy_port))
    one_line(result, naming=f"cannot listen on 127.0.0.1:{busy_port}")
    assert "funded" not in result.stdout
    assert not (tmp_path / "home" / "chain-journal.jsonl").exists()


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("mock-cloud", "--provider", "runpod"), {}),
        (("mock-cloud",), {}),
        (("gpu-worker",), {}),
        (("mock-vendor", "--vendor-id", "gpu_vendor_1"), {}),
        (("gateway", "--cloud", "runpod"), {"RUNPOD_API_KEY": "mock-runpod-key"}),
    ],
)
def test_a_server_on_a_busy_port_says_so_before_its_banner(
    tmp_path: Path, busy_port: int, args: tuple[str, ...], extra: dict[str, str]
) -> None:
    """Before the fix: a banner saying where it serves, then uvicorn's bind error."""
    result = procure(tmp_path, *args, "--port", str(busy_port), **extra)
    one_line(result, naming=f"cannot listen on 127.0.0.1:{busy_port}")
    assert result.stdout.strip() == ""


# 4. mock-cloud options that would be ignored


def test_a_workload_for_a_cloud_that_runs_none_is_refused(tmp_path: Path) -> None:
    """Before the fix: `--provider runpod --workload jobs.csv` served RunPod and never ran a job
    of the file."""
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("submit_s,gpus,duration_s\n0,1,60\n")
    for flag, value in (("--workload", str(jobs)), ("--synthetic-seed", "1")):
        result = procure(
            tmp_path, "mock-cloud", "--provider", "runpod", flag, value, "--port", str(free_port())
        )
        assert result.returncode == 2, result.stderr
        one_line(result, naming=flag)


def _first_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out.get(timeout=timeout)


@pytest.mark.parametrize("provider", ["lambda", "runpod"])
def test_mock_cloud_without_nodes_does_not_promise_nodes(tmp_path: Path, provider: str) -> None:
    """Before the fix: with --no-nodes the banner still said "nodes on 127.0.0.N:9876"."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "procure.cli",
            "mock-cloud",
            "--provider",
            provider,
            "--no-nodes",
            "--port",
            str(free_port()),
        ],
        env=_env(tmp_path, {}),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = _first_line(proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "on http://127.0.0.1:" in banner, banner
    assert "127.0.0.N" not in banner and "no GPU nodes" in banner, banner


# 5. Help that shows its defaults, "not found" that says where the ids are


def _help(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "procure.cli", *args, "--help"],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.replace("│", " ").split())


def test_help_says_the_defaults_it_used_to_hide() -> None:
    """Before the fix: no default shown for these three."""
    assert "(default: LAMBDA_LABS_SCAN_INTERVAL_S, else 60)" in _help("fleet", "run")
    assert "(default: run until stopped)" in _help("worker")
    assert "(default: RUNPOD_IMAGE or VAST_IMAGE)" in _help("vendors", "add-cloud")


def test_not_found_says_where_the_ids_are_listed(tmp_path: Path) -> None:
    """Before the fix: "vendor nope not found", "no action nope", and no more."""
    cooled = procure(tmp_path, "vendors", "clear-cooldown", "nope")
    assert "procure vendors list" in one_line(cooled, naming="nope")
    approved = procure(tmp_path, "fleet", "approve", "nope")
    assert "procure fleet actions" in one_line(approved, naming="nope")


# 5. Log lines


def test_a_vast_429_that_is_retried_is_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Before the fix: every 429 was a WARNING, though the client waits it out and tries again
    (`procure offers` printed "Vast.ai answered 429" on stderr, and all was well)."""
    import asyncio

    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.mock import start_mock_cloud
    from procure.clouds.vast.mockstate import MockVastConfig
    from procure.clouds.vast.settings import VastSettings

    key = "vast-ROUGH-key-0123456789abcdef0123"
    cloud = start_mock_cloud(
        MockVastConfig(
            api_key=key, speed=0, boot_s=60, outbid_per_hour=0, rate_scale=0.5, nodes=False
        )
    )

    def client(retries: int) -> VastCloud:
        return VastCloud(
            VastSettings(
                VAST_API_KEY=key,
                VAST_API_URL=cloud.url,
                VAST_PACE_SCALE=0,
                VAST_RATE_LIMIT_RETRIES=retries,
            )
        )

    async def scenario() -> None:
        first = client(0)
        await first.find("x")
        await first.aclose()
        second = client(3)  # a new process: it knows nothing of the last call, and gets a 429
        assert await second.find("x") == []
        await second.aclose()

    try:
        with caplog.at_level(logging.INFO, logger="procure.clouds.vast.client"):
            asyncio.run(scenario())
    finally:
        cloud.stop()
    mine = [r for r in caplog.records if r.name == "procure.clouds.vast.client"]
    assert any("429" in r.getMessage() for r in mine), mine
    assert [r.getMessage() for r in mine if r.levelno >= logging.WARNING] == []


def test_an_llm_planner_without_its_key_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix: nothing at the start, then each tick fell back on "APIConnectionError:
    Connection error." with no word of the key."""
    from procure.agent.llm_planner import make_llm_planner
    from procure.settings import Settings

    for name in list(os.environ):
        if name.startswith(cli_run.OURS):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no `.env` of the developer's
    monkeypatch.setenv("PLANNER_MODE", "llm")
    with caplog.at_level(logging.WARNING, logger="procure.agent.llm_planner"):
        make_llm_planner(Settings())
    said = [r.getMessage() for r in caplog.records if r.name == "procure.agent.llm_planner"]
    assert len(said) == 1, said
    assert "FIREWORKS_API_KEY is not set" in said[0] and "heuristic" in said[0]


def test_a_worker_paying_a_vendor_logs_no_sdk_signing_line(
    tmp_path: Path, facilitator: LocalServer
) -> None:
    """Before the fix: each payment added an INFO line of the x402 SDK ("x402.signers:
    EthAccountSigner.sign_typed_data: primaryType=...") to the worker's and server's logs."""
    servers, env = _seeded_mock_vendors(tmp_path, facilitator)
    try:
        started = procure(tmp_path, "run", "start", "--goal", "g", "--budget", "5", **env)
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["_id"]
        worked = procure(tmp_path, "worker", "--once", **env)
        assert worked.returncode == 0, worked.stderr
        status = json.loads(procure(tmp_path, "run", "status", run_id, **env).stdout)
        assert any(o["content"].startswith("Paid ") for o in status["observations"]), status
        assert "sign_typed_data" not in worked.stdout + worked.stderr
    finally:
        for server in servers:
            server.stop()
