"""`procure --help` and the commands that only read the store answer quickly: a start imports
what the command needs, not the servers' stack (FastAPI, uvicorn, x402, web3, eth_account), and
help or a refused option not even the settings or the store. Asserted on the modules a real
`procure` process has loaded when it ends, not on a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import cli_env
from procure.local import free_port

# Runs `procure` as its script does, then writes the names of the modules it loaded to a file:
# at exit, so that what the command imported while it ran counts too
_LOADED = """
import atexit, json, runpy, sys

out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["procure", *sys.argv[2:]]
runpy.run_module("procure.cli", run_name="__main__")
"""

SERVERS = ("fastapi", "starlette", "uvicorn", "x402", "web3", "eth_account", "httpx")
STORE = ("sqlalchemy", "alembic")
SETTINGS = ("pydantic_settings",)


def loaded(
    tmp_path: Path, *args: str, **extra: str
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """`procure *args` in a process of its own (`extra` in its environment), and the top-level
    packages it had loaded."""
    where = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", _LOADED, str(where), *args],
        cwd=tmp_path,
        env=cli_env(tmp_path, extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = json.loads(where.read_text())
    return result, {name.split(".")[0] for name in names}


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        (),  # no arguments: the help too
        ("run", "--help"),
        ("fleet", "--help"),
        ("gateway", "status", "--help"),
        ("serve", "--help"),
    ],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_help_loads_neither_the_servers_nor_the_store_nor_the_settings(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Before the fix: every start imported the settings (pydantic-settings) at once, though
    `--help` reads none: it cost `procure --help` more than the help itself (0.4 s of CPU
    against 0.2)."""
    result, packages = loaded(tmp_path, *args)
    assert "Usage" in result.stdout, result.stdout[-800:] + result.stderr[-800:]
    assert packages.isdisjoint(SERVERS + STORE + SETTINGS), sorted(
        packages & set(SERVERS + STORE + SETTINGS)
    )


def test_an_option_refused_at_parsing_loads_nothing_heavy(tmp_path: Path) -> None:
    """Before the fix: a port typer refuses (`serve --port 0`) still loaded the settings first."""
    result, packages = loaded(tmp_path, "serve", "--port", "0")
    assert result.returncode == 2 and "--port" in result.stderr, result.stderr[-800:]
    assert "Traceback" not in result.stderr
    assert packages.isdisjoint(SERVERS + STORE + SETTINGS), sorted(
        packages & set(SERVERS + STORE + SETTINGS)
    )


def test_gateway_status_reads_the_book_without_the_gateway_server(tmp_path: Path) -> None:
    """Before the fix: `procure gateway status` imported the gateway's server module for its
    five lines of store read, and with it FastAPI, uvicorn, x402 and web3 (about 1.5 s of CPU
    of its 2.3)."""
    result, packages = loaded(tmp_path, "gateway", "status", "--json")
    assert result.returncode == 0, result.stderr[-800:]
    book = json.loads(result.stdout)
    assert book["paymentsReceived"] == 0 and book["liveInstances"] == 0, book
    assert packages.isdisjoint(SERVERS), sorted(packages & set(SERVERS))


@pytest.mark.parametrize(
    "args", [("run", "list"), ("spend",), ("vendors", "list", "--json")], ids=" ".join
)
def test_a_store_read_loads_the_store_not_the_servers(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A command that reads the store loads the store, and not the servers' stack."""
    result, packages = loaded(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-800:]
    assert "sqlalchemy" in packages
    assert packages.isdisjoint(SERVERS), sorted(packages & set(SERVERS))


SIGNING = ("web3",)  # the x402 SDK's EVM code, which signs a payment


@pytest.mark.parametrize(
    "args",
    [("worker", "--once"), ("run", "tick", "no-such-run"), ("run", "cancel", "no-such-run")],
    ids=" ".join,
)
def test_a_start_that_pays_nobody_loads_no_signing_code(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Before the fix: the payer imported the x402 SDK's EVM scheme, and with it web3 (about
    0.5 s of CPU), at every start of the agent: a worker with nothing to pay, a tick or a cancel
    of a run that does not exist loaded it too. It is loaded at the first payment now."""
    result, packages = loaded(tmp_path, *args)
    assert "Traceback" not in result.stderr, result.stderr[-800:]
    assert "sqlalchemy" in packages  # the command did reach the store
    assert packages.isdisjoint(SIGNING), sorted(packages & set(SIGNING))


def test_vendors_seed_loads_neither_the_chain_nor_the_servers(tmp_path: Path) -> None:
    """Before the fix: `procure vendors seed` asks the facilitator for its asset through
    `procure.local`, which imported the local chain (web3, eth_tester), FastAPI and the mock
    vendor's x402 server (about 1.2 s of CPU) for one HTTP GET."""
    result, packages = loaded(
        tmp_path, "vendors", "seed", X402_FACILITATOR_URL=f"http://127.0.0.1:{free_port()}"
    )
    assert result.returncode == 1 and "procure facilitator" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "sqlalchemy" in packages
    chain = ("web3", "eth_tester", "fastapi", "starlette", "uvicorn")
    assert packages.isdisjoint(chain), sorted(packages & set(chain))


WALLET = ("eth_account", "eth_keyfile", "py_ecc")  # eth_account signs; the rest it imports


@pytest.mark.parametrize(
    "args",
    [
        ("worker", "--once"),
        ("run", "tick", "no-such-run"),
        ("run", "cancel", "no-such-run"),
        ("vendors", "seed"),  # the mock vendors' payees are addresses of keys
        ("wallet",),  # shows the wallet's address (here: then says the facilitator is down)
    ],
    ids=" ".join,
)
def test_a_start_that_signs_nothing_loads_no_wallet_library(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Before the fix: the agent's wallet was eth_account's account, built at every start of
    the agent and of `procure wallet`, and the seeds' payees were derived with it: eth_account
    and what it imports (eth_keyfile, py_ecc: about 0.6 s of CPU) were loaded by every start,
    though only a payment signs. The address is derived with coincurve now."""
    result, packages = loaded(
        tmp_path, *args, X402_FACILITATOR_URL=f"http://127.0.0.1:{free_port()}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-800:]
    assert packages.isdisjoint(WALLET), sorted(packages & set(WALLET))
    assert "coincurve" in packages  # the wallet's address was derived


@pytest.mark.parametrize("story", ["recovery", "clouds"])
def test_a_demo_refuses_a_bad_setting_before_loading_its_stack(tmp_path: Path, story: str) -> None:
    """Before the fix: `procure demo` imported the agent, the store and the servers, then
    started its chain (web3, eth_tester), and only then read the settings: a one-line settings
    error cost 2.5 s of CPU."""
    result, packages = loaded(tmp_path, "demo", story, VENDOR_TIMEOUT_S="abc")
    assert result.returncode == 1, result.stderr[-800:]
    assert "VENDOR_TIMEOUT_S" in result.stderr and "Traceback" not in result.stderr
    heavy = (*SERVERS, *STORE, "eth_tester")
    assert packages.isdisjoint(heavy), sorted(packages & set(heavy))
