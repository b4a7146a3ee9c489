"""The agent's wallet from the command line: `procure wallet` shows its address and on-chain
balance (never its key) and `--fund` asks the faucet; `procure facilitator` funds it once, at its
first start, and not again when restarted on the same chain journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from procure.local import free_port, start_facilitator
from procure.payments.chain import LocalChain
from procure.payments.facilitator import fund_wallet_once
from procure.payments.wallet import load_or_create_account
from world import procure_cli as procure


def test_wallet_shows_address_and_balance_and_funds_without_showing_the_key(
    tmp_path: Path,
) -> None:
    facilitator = start_facilitator(tmp_path / "chain.jsonl")
    try:
        env = {"PROCURE_HOME": str(tmp_path / "home"), "X402_FACILITATOR_URL": facilitator.url}
        shown = procure("wallet", "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        key = (tmp_path / "home" / "wallet.key").read_text().strip()
        address = load_or_create_account(None, tmp_path / "home").address
        assert json.loads(shown.stdout) == {
            "address": address,
            "balance": 0.0,
            "facilitator": facilitator.url,
        }

        funded = procure("wallet", "--fund", "12.5", env=env)
        assert funded.returncode == 0, funded.stderr
        assert "funded with $12.50" in funded.stdout and "$12.50" in funded.stdout
        assert address in funded.stdout
        assert facilitator.app.state.chain.balance_of(address) == 12_500_000
        for out in (shown, funded):
            assert key not in out.stdout + out.stderr
            assert key.removeprefix("0x") not in out.stdout + out.stderr
    finally:
        facilitator.stop()


def test_wallet_says_how_to_start_a_facilitator_that_does_not_answer(tmp_path: Path) -> None:
    env = {
        "PROCURE_HOME": str(tmp_path / "home"),
        "X402_FACILITATOR_URL": f"http://127.0.0.1:{free_port()}",
    }
    result = procure("wallet", env=env)
    assert result.returncode == 1
    assert "did not answer" in result.stderr and "procure facilitator" in result.stderr


def test_fund_wallet_once_is_once_per_chain_even_across_restarts(tmp_path: Path) -> None:
    journal = tmp_path / "chain.jsonl"
    address = load_or_create_account(None, tmp_path).address
    chain = LocalChain(journal)
    assert fund_wallet_once(chain, address, 50_000_000) is not None
    assert fund_wallet_once(chain, address, 50_000_000) is None
    assert fund_wallet_once(LocalChain(journal), address, 50_000_000) is None  # replayed
    assert LocalChain(journal).balance_of(address) == 50_000_000
    assert fund_wallet_once(chain, address, 0) is None  # funding turned off


def _start_facilitator_cli(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", "facilitator", "--port", str(port)],
        env={**os.environ, "COLUMNS": "200", **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"facilitator did not start:\n{log.read_text()}")


def test_facilitator_command_funds_the_agent_wallet_at_first_start_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    port = free_port()
    env = {
        "PROCURE_HOME": str(home),
        "PROCURE_WALLET_FUNDING": "50",
        "X402_FACILITATOR_URL": f"http://127.0.0.1:{port}",
    }
    log = tmp_path / "facilitator.log"
    for _ in range(2):  # the second start replays the same journal: no second funding
        proc = _start_facilitator_cli(env, port, log)
        try:
            # The balance `procure wallet` shows (tested above), asked here without a Python
            # start per look: the wallet the facilitator made (or found) in the agent's home.
            address = load_or_create_account(None, home).address
            shown = httpx.get(f"{env['X402_FACILITATOR_URL']}/balance/{address}", timeout=30)
            assert shown.status_code == 200, shown.text
            assert float(shown.json()["balance"]) == 50.0
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)  # a busy machine: shutting down takes its time
    text = log.read_text()
    assert text.count("funded the agent's wallet") == 1, text
    assert text.count("agent wallet 0x") == 2
    assert (home / "wallet.key").read_text().strip() not in text
