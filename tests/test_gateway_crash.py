"""The gateway killed (kill -9 at named crash points, `procure.crashpoints`) around a paid job:
after settlement before booking, after booking before launch, after the intent before the
cloud call, and after the launch before its record. Restarted, it ends with exactly one instance
for the paid job, the job run, nothing left running, and the payment counted once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from procure.gateway import book
from procure.local import free_port
from procure.models import usd_to_micros
from procure.store import open_store
from test_gateway import (
    SECRET,
    TRAIN,
    GatewayWorld,
    buyer,
    nonce,
    signed_payment,
    start_gateway_world,
    wait_for,
)


def spawn(
    gw: GatewayWorld, tmp: Path, port: int, crash_at: str | None, db: str | None = None
) -> subprocess.Popen[bytes]:
    """`procure.gateway.serve` of `gw`'s config as a process on `port`, on the store `db` (a
    SQLite file of its own unless given), dying at `crash_at` if set; once it answers."""
    config = dataclasses.asdict(gw.cfg)
    spec = {
        "config": config,
        "databaseUrl": db or f"sqlite:///{tmp / 'child-gateway.db'}",
        "facilitatorUrl": gw.world.facilitator.url,
        "port": port,
    }
    path = tmp / "gateway.json"
    path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        "RUNPOD_API_KEY": gw.mock.api_key,
        "RUNPOD_API_URL": gw.mock.url,
        "PROCURE_CRASH_AT": crash_at or "",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "procure.gateway.serve", str(path)],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        if proc.poll() is not None:
            if proc.returncode == 137 and crash_at:
                return True  # died at its crash point before it was asked anything
            raise AssertionError(f"the gateway exited with {proc.returncode}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60)
    return proc


def paid_submit(
    url: str, gw: GatewayWorld, key: str, payment: str | None, q: dict[str, Any]
) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {SECRET}",
        "Idempotency-Key": key,
        "X-Quote-Id": q["quoteId"],
    }
    if payment:
        headers["PAYMENT-SIGNATURE"] = payment
    return httpx.post(
        f"{url}/submit-job", json={"quoteId": q["quoteId"]}, headers=headers, timeout=30
    )


@pytest.mark.timeout(400)
def test_kill_9_around_paid_jobs_leaves_one_instance_each_and_no_orphan(
    tmp_path: Path, sqlite_url: str
) -> None:
    # One gateway life per crash point (a restart costs seconds on a busy machine): each life
    # dies at the next point on the way of the same paid job, then of a second one.
    gw = start_gateway_world(
        tmp_path,
        sqlite_url,
        command=(sys.executable, TRAIN, "--steps", "10", "--step-time", "0.05"),
        hour_s=3600.0,  # restarts take long on a busy machine: the paid time must outlast them
    )
    gw.server.stop()  # this gateway runs as a child process instead
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {SECRET}"}
    proc = spawn(gw, tmp_path, port, "recorded:1")
    try:

        def pay(key: str) -> tuple[dict[str, Any], str]:
            q = httpx.post(
                f"{url}/quote", json={"gpuType": "RTX4090", "hours": 1}, headers=headers
            ).json()
            first = paid_submit(url, gw, key, None, q)
            assert first.status_code == 402
            payment = signed_payment(gw, first.headers["PAYMENT-REQUIRED"], buyer(gw, key), nonce())
            with contextlib.suppress(httpx.HTTPError):  # the gateway dies while answering
                paid_submit(url, gw, key, payment, q)
            return q, payment

        def died() -> None:
            assert proc.wait(timeout=120) == 137  # at the crash point, as by kill -9

        # Life 1: job 1 is settled and booked, and the gateway dies before answering.
        q1, pay1 = pay("job-1")
        died()
        # Life 2: the loop finds job 1 paid, writes the launch intent and dies before
        # calling the cloud.
        proc = spawn(gw, tmp_path, port, "intent:1")
        died()
        assert gw.pods() == []
        # Life 3: looks for the instance by name, finds none, launches; dies before the record.
        proc = spawn(gw, tmp_path, port, "fleet_launched:1")
        died()
        assert len(gw.pods()) == 1
        # Life 4: finds the instance by name and runs job 1 on it (no second launch). The buyer
        # retries job 1 (same key, same payment): the same job, not charged again. Job 2 is
        # settled and the gateway dies before booking it.
        proc = spawn(gw, tmp_path, port, "paid:1")
        again = paid_submit(url, gw, "job-1", pay1, q1)
        assert again.status_code == 200, again.text
        assert again.headers.get("X-Idempotent-Replay") == "true"
        job1 = again.json()["jobId"]
        q2, pay2 = pay("job-2")
        died()
        # Life 5: the retry of job 2 finds its settlement (the facilitator says the payment's
        # nonce is used) and books it once; both jobs run to their end.
        proc = spawn(gw, tmp_path, port, None)
        retry = paid_submit(url, gw, "job-2", pay2, q2)
        assert retry.status_code == 200, retry.text
        job2 = retry.json()["jobId"]

        def status(job_id: str) -> str:
            answer = httpx.get(f"{url}/job-status", params={"jobId": job_id}, headers=headers)
            return str(answer.json().get("status"))

        wait_for(lambda: status(job1) == status(job2) == "completed" and gw.live_pods() == [], 90)
        pods = gw.pods()
        assert len(pods) == 2, pods  # exactly one instance per paid job, none left running
        assert gw.income() == usd_to_micros(q1["amount"]) + usd_to_micros(q2["amount"])
        store = open_store(f"sqlite:///{tmp_path / 'child-gateway.db'}")
        try:
            wait_for(lambda: book.figures(store)["jobs"] == {"completed": 2})
            figures = book.figures(store)
            assert figures["paymentsReceived"] == 2
            assert usd_to_micros(figures["incomeUsd"]) == gw.income()
            assert figures["instancesLaunched"] == 2
        finally:
            store.dispose()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        gw.mock.stop()
        gw.store.dispose()
        gw.world.stop()
