"""A newcomer's first hour with `procure`: a wrong value in the environment or `.env` is one line
naming the setting (never a traceback), `.env` counts everywhere, and a command that fails to start
has spent nothing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from cli_run import cli_env, one_line, procure
from procure.local import free_port


def test_a_malformed_wallet_key_is_one_line_naming_it(tmp_path: Path) -> None:
    """Before the fix: x402_PRIVATE_KEY is not checked when the settings load: a key one byte short
    (a copy and paste cut) makes `procure wallet` and `procure run tick` die with a 60-line
    traceback."""
    key = "0x" + "ab" * 31
    result = procure(tmp_path, "wallet", X402_PRIVATE_KEY=key)  # `run tick` dies the same
    one_line(result, naming="X402_PRIVATE_KEY")
    assert key[2:] not in result.stdout + result.stderr  # a secret is never echoed


def test_a_malformed_secret_key_is_one_line_naming_it(tmp_path: Path) -> None:
    """Before the fix: PROCURE_SECRET_KEY that is not a Fernet key makes `run tick` and `worker` end
    in a CredentialError traceback, whose message never says which variable is wrong."""
    # `worker` and `vendors seed` die the same way; `serve` died in its app's start
    for command in (("run", "tick", "no-such-run"), ("serve", "--port", str(free_port()))):
        result = procure(tmp_path, *command, PROCURE_SECRET_KEY="not-a-fernet-key")
        one_line(result, naming="PROCURE_SECRET_KEY")
        assert "not-a-fernet-key" not in result.stdout + result.stderr


def test_a_procure_home_that_is_a_file_isone_line(tmp_path: Path) -> None:
    """Before the fix: PROCURE_HOME pointing at a file (or anywhere that cannot hold the wallet key)
    makes `procure wallet` end in a FileExistsError traceback instead of a line naming
    PROCURE_HOME."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    result = procure(tmp_path, "wallet", PROCURE_HOME=str(home))
    one_line(result, naming="PROCURE_HOME")


def test_gateway_status_on_a_store_that_cannot_be_opened_isone_line(
    tmp_path: Path,
) -> None:
    """Before the fix: `procure gateway status` is the one store-reading command without
    `store_errors`: a mistyped PROCURE_DATABASE_URL is an SQLAlchemy ArgumentError traceback
    there."""
    result = procure(tmp_path, "gateway", "status", PROCURE_DATABASE_URL="not-a-url")
    line = one_line(result, naming="the store")
    assert "Could not parse" in line


def test_demo_with_a_bad_setting_in_the_environment_isone_line(tmp_path: Path) -> None:
    """Before the fix: `procure demo` builds its Settings outside `settings_errors`: a value the
    other commands refuse in one line (FAIL_AT=2, say from a `.env` the user edited) is a pydantic
    traceback."""
    (tmp_path / ".env").write_text("FAIL_AT=2\n")
    result = procure(tmp_path, "demo")
    one_line(result, naming="FAIL_AT")


def _wait_listening(port: int, proc: subprocess.Popen[str], deadline_s: float = 30) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port} after {deadline_s}s")


def test_mock_cloud_takes_the_key_in_dotenv_that_the_clients_send(tmp_path: Path) -> None:
    """Before the fix: `procure mock-cloud` reads LAMBDA_API_KEY from os.environ only, while every
    client (offers, fleet, agent) reads it from `.env` too: with the key in `.env`, as
    `.env.example` suggests, the mock wants `mock-lambda-key` and refuses the key `procure offers`
    sends (401)."""
    port = free_port()
    (tmp_path / ".env").write_text(
        f"LAMBDA_API_KEY=key-from-dotenv\nLAMBDA_API_URL=http://127.0.0.1:{port}\n"
    )
    mock = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", "mock-cloud", "--port", str(port), "--no-nodes"],
        cwd=tmp_path,
        env=cli_env(tmp_path, {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_listening(port, mock)
        result = procure(tmp_path, "offers", "--json")
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["errors"] == [], answer["errors"]
        assert any(o["source"].startswith("lambda") for o in answer["offers"]), answer
    finally:
        mock.terminate()
        mock.communicate(timeout=30)


def test_serve_on_a_busy_port_fails_before_it_pays_anyone(tmp_path: Path) -> None:
    """Before the fix: `procure serve` starts its worker in the app's lifespan, before uvicorn
    binds: on a port already taken it ticks the due runs (quotes, pays a vendor, starts a job) and
    only then exits with 'address already in use', so a start the user sees fail has spent their
    money."""
    from procure.store import repo
    from stores import migrated_sqlite
    from world import start_world

    w = start_world(tmp_path, migrated_sqlite(tmp_path / "procure.db"))
    try:
        env = {
            "PROCURE_DATABASE_URL": w.settings.database_url,
            "PROCURE_HOME": str(w.settings.home),
            "GPU_VENDOR_SECRET": w.settings.gpu_vendor_secret.get_secret_value(),
            "X402_FACILITATOR_URL": w.settings.facilitator_url,
        }
        run_id = w.new_run(budget=5.0)  # due now (a `procure run start` costs a Python start)
        with socket.socket() as busy:  # something else already listens on the port
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = str(busy.getsockname()[1])
            served = procure(tmp_path, "serve", "--port", port, **env)
        assert served.returncode != 0
        said = served.stdout + served.stderr
        assert "in use" in said or "busy" in said, said[-800:]
        with w.store.session() as s:
            state = repo.load_state(s, run_id)
        assert state is not None
        assert state.payments == [] and state.jobs == [], "a server that never started paid"
    finally:
        w.stop()


def test_wallet_shows_a_balance_the_facilitator_answers_as_a_string(
    tmp_path: Path,
) -> None:
    """Before the fix: `procure wallet` checks the facilitator's balance with float(), then formats
    the raw value with `:,.2f`: a balance sent as a JSON string ("12.50", as many payment APIs send
    amounts) passes the check and dies in a ValueError traceback."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Facilitator(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"balance": "12.50"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Facilitator)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = procure(tmp_path, "wallet", X402_FACILITATOR_URL=url)
    finally:
        server.shutdown()
        server.server_close()
    full = result.stdout + result.stderr
    out = full[-800:]
    assert "Traceback" not in full, out
    if result.returncode == 0:  # shown as the number it is
        assert "12.50" in result.stdout, out
    else:  # or refused in one line, naming the facilitator
        assert result.stderr.startswith("error: ") and url in result.stderr, out


def test_an_unknown_log_level_isone_line(tmp_path: Path) -> None:
    """Before the fix: `--log-level` takes any string and hands it to logging.basicConfig: a level
    logging does not know (`verbose`) is a ValueError traceback instead of a usage error naming the
    option."""
    result = procure(tmp_path, "worker", "--once", "--log-level", "verbose")  # gpu-worker too
    full = result.stdout + result.stderr
    assert result.returncode != 0, full[-800:]
    assert "Traceback" not in full and "--log-level" in result.stderr, full[-800:]


_NO_PASSWD_ENTRY = """
import pwd, runpy, sys

def getpwuid(uid):  # as in a container run under an arbitrary uid (Kubernetes runAsUser)
    raise KeyError(f"getpwuid(): uid not found: {uid}")

pwd.getpwuid = getpwuid
sys.argv = ["procure", *sys.argv[1:]]
runpy.run_module("procure.cli", run_name="__main__")
"""


def test_run_cancel_works_for_a_user_without_a_passwd_entry(tmp_path: Path) -> None:
    """Before the fix: `procure run cancel` names the canceller with getpass.getuser(), which raises
    KeyError when the uid has no passwd entry and USER/LOGNAME are unset (a container under an
    arbitrary uid): the cancel dies in a traceback and the run goes on spending."""
    started = procure(tmp_path, "run", "start", "--goal", "x", "--budget", "5")
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["_id"]
    env = cli_env(tmp_path, {})
    for name in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        env.pop(name, None)
    cancel = subprocess.run(
        [sys.executable, "-c", _NO_PASSWD_ENTRY, "run", "cancel", run_id, "--reason", "stop"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cancel.returncode == 0, (cancel.stdout + cancel.stderr)[-800:]
    status = json.loads(procure(tmp_path, "run", "status", run_id).stdout)
    assert status["run"]["status"] == "cancelled"
