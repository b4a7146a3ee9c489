"""`procure demo --serve` as a new user runs it: the story, then the dashboard on a printed URL
showing the demo's completed run, with its services still up, and a fleet to look at (a mock
cloud's instances with simulated GPU nodes, watched by the fleet controller in dry run), until
Ctrl+C (SIGINT) ends it cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue

import httpx
import pytest

from procure.local import free_port


def _lines(stream: object, into: Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


@pytest.mark.timeout(300)  # a start and a stop of a dozen services, each waited on for 120 s
def test_demo_serve_keeps_the_dashboard_up_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    command = ["demo", "--serve", "--port", str(port), "--job-seconds", "0.5"]
    scratch = tmp_path / "tmp"  # the demo's own temporary folder (its store, its wallet key)
    scratch.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-m", "procure.cli", *command],
        cwd=tmp_path,  # no .env of the checkout
        # SIGABRT dumps every thread's stack (faulthandler) should it not stop.
        env={
            **os.environ,
            "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1",
            "TMPDIR": str(scratch),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: Queue[str] = Queue()
    reader = threading.Thread(target=_lines, args=(child.stdout, seen), daemon=True)
    reader.start()
    output: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            try:
                line = seen.get(timeout=1)
            except Empty:
                assert child.poll() is None, "".join(output)
                continue
            output.append(line)
            found = re.match(r"dashboard (http://127\.0\.0\.1:\d+)/ \(Ctrl\+C to stop\)", line)
            url = found.group(1) if found else None
        assert url == f"http://127.0.0.1:{port}", "".join(output)
        runs = httpx.get(url + "/", timeout=60)
        assert runs.status_code == 200
        assert "Fine-tune tiny-llm on dataset A" in runs.text
        (run_id,) = re.findall(r'data-run="([0-9a-f]+)"', runs.text)
        assert re.search(rf'data-run="{run_id}".*?status-completed', runs.text, re.S)
        run = httpx.get(f"{url}/runs/{run_id}", timeout=60).text
        # Every payment (each vendor's short first slice, then the rest) with its hash.
        payments = run.split("<th>Transaction</th>", 1)[1].split("</tbody>", 1)[0]
        paid = payments.count("status-completed")
        assert paid >= 2 and payments.count('class="hash tx"') == paid, payments
        vendors = httpx.get(url + "/vendors", timeout=60)
        assert 'id="wallet-balance">$' in vendors.text  # the facilitator is still up
        # The Fleet page lists the demo cloud's instances with the controller's figures ...
        fleet = httpx.get(url + "/fleet", timeout=60).text
        rows = re.findall(r'<tr data-instance="([0-9a-f]+)">(.*?)</tr>', fleet, re.S)
        assert len(rows) == 2, fleet
        cells = " ".join(row for _, row in rows)
        assert sorted(re.findall(r"demo-gpu-\d", cells)) == ["demo-gpu-1", "demo-gpu-2"]
        # each sparkline, its scale, then the latest figure: busy and idle
        latest = re.findall(r"</svg>(?:<span class=\"spark-scale[^>]*>[^<]*</span>)? (\d+)%", cells)
        assert sorted(latest) == ["0", "98"], cells
        assert "Instances (2 running of at most 4)" in fleet
        # ... and the Nodes page each node, reachable, with its figures.
        nodes = httpx.get(url + "/nodes", timeout=60).text
        assert sorted(
            re.findall(r'<section class="card node" data-instance="([0-9a-f]+)"', nodes)
        ) == sorted(instance for instance, _ in rows)
        assert nodes.count(">reachable</span>") == 2
        assert nodes.count('class="util">98%') == 1 and nodes.count('class="util">0%') == 1
        instances = httpx.get(url + "/api/fleet/instances", timeout=60).json()
        assert {i["name"] for i in instances} == {"demo-gpu-1", "demo-gpu-2"}
        child.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        # Generous: on a busy machine the services' shutdown may take long; a hang would not end.
        try:
            code = child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGABRT)
            child.wait(timeout=30)
            reader.join(timeout=30)  # it reads to the end: the stacks are there
            while not seen.empty():
                output.append(seen.get())
            raise AssertionError("no exit 120 s after Ctrl+C:\n" + "".join(output)) from None
        assert code == 0, f"exit {code} after {time.monotonic() - stopping:.0f} s"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    while not seen.empty():
        output.append(seen.get())
    text = "".join(output)
    assert "Traceback" not in text, text
    # Its folder went with it: it held the demo wallet's key (it was left behind, one per run).
    assert not list(scratch.glob("procure-demo-*")), list(scratch.iterdir())
    assert "stopping" in text
