"""Registration with a mock go-livepeer orchestrator over real HTTP: the BYOC body and raw secret,
retries with backoff until accepted, registering again when the orchestrator forgets, a wrong
secret reported and not retried, unregistering on a clean stop, and self-signed TLS only when
explicitly allowed."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gpu_fakes import FakeNvml, Orchestrator, eventually, mock_orchestrator, two_gpus
from procure.gpu.probe import read_nvml
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from procure.local import LocalServer, free_port, serve

SECRET = "orch-secret"
NAME = "agent-net-test"


@contextmanager
def worker(orchestrator_url: str, **env: Any) -> Iterator[tuple[LocalServer, httpx.Client]]:
    settings = GpuWorkerSettings(
        ORCHESTRATOR_URL=orchestrator_url,
        ORCHESTRATOR_SECRET=env.pop("secret", SECRET),
        CAPABILITY_NAME=NAME,
        CAPABILITY_URL="http://worker:9876",
        CAPABILITY_RETRY_MIN_S=0.05,
        CAPABILITY_RETRY_MAX_S=0.2,
        **env,
    )
    module = FakeNvml(two_gpus()).module()
    server = serve(create_gpu_worker_app(settings, read=lambda: read_nvml(module)))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield server, client
    finally:
        server.stop()


@pytest.fixture
def orch() -> Iterator[tuple[Orchestrator, str]]:
    state = Orchestrator(secret=SECRET)
    server = serve(mock_orchestrator(state))
    yield state, server.url
    server.stop()


def registration(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/healthz").json()["registration"])


def test_registers_on_start_and_unregisters_on_a_clean_stop(
    orch: tuple[Orchestrator, str],
) -> None:
    state, url = orch
    with worker(url, CAPABILITY_PRICE_PER_UNIT=29_000_000_000_000) as (_, client):
        eventually(lambda: NAME in state.registered, "registration")
        assert state.registered[NAME] == {
            "name": NAME,
            "description": "GPU health and model listing (BYOC)",
            "url": "http://worker:9876",
            "capacity": 10,
            "price_per_unit": 29_000_000_000_000,
            "price_scaling": 1,
            "currency": "wei",
            "requirements": {"video_ingress": False, "video_egress": False, "data_output": True},
        }
        assert state.headers_seen[0] == SECRET  # the raw secret, no "Bearer", as go-livepeer
        health = client.get("/healthz")
        assert health.json()["registration"]["state"] == "registered"
        assert SECRET not in health.text
    assert state.unregistered == [NAME] and NAME not in state.registered


def test_retries_with_backoff_until_accepted(orch: tuple[Orchestrator, str]) -> None:
    state, url = orch
    state.fail_first = 3
    with worker(url) as (_, client):
        eventually(lambda: NAME in state.registered, "registration after 503s")
        eventually(lambda: registration(client)["state"] == "registered", "state")
        assert state.attempts == 4 and registration(client)["attempts"] == 4


@pytest.mark.parametrize("status", [429, 408])
def test_too_many_requests_is_retried_not_a_refusal(
    orch: tuple[Orchestrator, str], status: int
) -> None:
    state, url = orch
    state.fail_first, state.fail_status = 2, status
    with worker(url) as (_, client):
        eventually(lambda: NAME in state.registered, f"registration after {status}s")
        eventually(lambda: registration(client)["state"] == "registered", "state")
        assert state.attempts == 3


def test_an_orchestrator_that_starts_late_is_registered_with() -> None:
    port = free_port()
    state = Orchestrator(secret=SECRET)
    with worker(f"http://127.0.0.1:{port}") as (_, client):
        eventually(lambda: registration(client)["state"] == "retrying", "retrying")
        assert "no answer" in registration(client)["last_error"]
        late = serve(mock_orchestrator(state), port)
        try:
            eventually(lambda: NAME in state.registered, "registration once it is up")
            eventually(lambda: registration(client)["state"] == "registered", "state")
        finally:
            late.stop()


def test_registers_again_when_the_orchestrator_forgets(orch: tuple[Orchestrator, str]) -> None:
    state, url = orch
    with worker(url, CAPABILITY_REFRESH_S=0.2):
        eventually(lambda: NAME in state.registered, "registration")
        state.forget()
        eventually(lambda: NAME in state.registered, "registration after a restart")
        assert state.registrations >= 2


def test_a_wrong_secret_is_reported_and_not_retried(orch: tuple[Orchestrator, str]) -> None:
    state, url = orch
    with worker(url, secret="not-the-secret", CAPABILITY_REFRESH_S=0.05) as (_, client):
        eventually(lambda: registration(client)["state"] == "refused", "refusal")
        found = client.get("/healthz")
        attempts = state.attempts
        time.sleep(0.5)  # many retry intervals: none may come
        assert state.attempts == attempts == 1
    said = found.json()["registration"]["last_error"]
    assert "invalid_authorization" in said and "ORCHESTRATOR_SECRET" in said
    assert "not-the-secret" not in found.text
    assert state.registered == {} and state.unregistered == []


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orchestrator")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = tmp / "key.pem", tmp / "cert.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


@contextmanager
def tls_orchestrator(state: Orchestrator, tmp: Path) -> Iterator[str]:
    key_file, cert_file = _self_signed(tmp)
    port = free_port()
    config = uvicorn.Config(
        mock_orchestrator(state),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_keyfile=str(key_file),
        ssl_certfile=str(cert_file),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    eventually(lambda: server.started, "TLS orchestrator start")
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_self_signed_tls_only_when_explicitly_allowed(tmp_path: Path) -> None:
    state = Orchestrator(secret=SECRET)
    with tls_orchestrator(state, tmp_path) as url:
        with worker(url) as (_, client):
            eventually(lambda: registration(client)["state"] == "retrying", "refused TLS")
            assert "CERTIFICATE_VERIFY_FAILED" in registration(client)["last_error"]
            assert state.registered == {}
        with worker(url, ORCHESTRATOR_INSECURE_TLS=True) as (_, client):
            eventually(lambda: NAME in state.registered, "registration over self-signed TLS")
