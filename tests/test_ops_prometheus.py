"""The shipped observability, checked by Prometheus' own tools: `promtool check rules` and
`promtool test rules` (each alert fires), `promtool check config` on the shipped scrape
configuration, and a real Prometheus, configured from that file with the scrape token, scraping
a demo-like `serve` (runs paying, one failing over, one past its budget warning, the fleet
controller over the mock cloud's GPU nodes): every query of the shipped Grafana dashboard
returns data. Skips outside CI only where Prometheus is not installed."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from procure.agent.worker import WorkerConfig
from procure.api.app import create_app
from procure.demos import serve as demo_serve
from procure.fleet import cap_warnings
from procure.local import serve
from procure.models import usd_to_micros
from procure.store import ledger
from prometheus_harness import eventually, promtool, running_prometheus
from world import start_world

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "procure-rules.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "procure-dashboard.json"
TOKEN = "scrape-token-5e1a"


def test_the_alert_rules_pass_promtool_and_each_alert_fires() -> None:
    checked = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "procure-rules.test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = (RULES.parent / "procure-rules.test.yml").read_text()
    alerts = [
        line.split(":")[1].strip() for line in RULES.read_text().splitlines() if "alert:" in line
    ]
    assert len(alerts) == 8
    for alert in alerts:  # every alert has a test where it fires
        assert f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in tests, alert


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def local_config(tmp: Path, serve_port: int, nodes: list[str]) -> Path:
    """The shipped configuration with this test's targets, token file and a 1 s interval."""
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    text = CONFIG.read_text()
    for old, new in [
        ("/etc/prometheus/procure-metrics-token", str(token_file)),
        ('["127.0.0.1:3000"]', json.dumps([f"127.0.0.1:{serve_port}"])),
        ('["127.0.0.1:9876"]', json.dumps(nodes)),
        ("15s", "1s"),
        ("- procure-rules.yml", f"- {RULES}"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    config = tmp / "prometheus.yml"
    config.write_text(text)
    return config


@pytest.fixture
def demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, list[str], Callable[[], None]]]:
    """A demo-like serve: the agent's world, the fleet in dry run over the mock cloud's two
    GPU nodes, the warnings sweep; every /metrics behind the scrape token."""
    monkeypatch.setenv("PROCURE_METRICS_TOKEN", TOKEN)  # the nodes read it at start
    world = start_world(
        tmp_path,
        f"sqlite:///{tmp_path / 'procure.db'}",
        vendor_overrides={"gpu_vendor_1": {"fail_rate": 1.0, "fail_at": 0.3}},
    )
    mock = demo_serve.demo_cloud()
    stop = threading.Event()
    try:
        fleet = demo_serve.demo_fleet(mock, tmp_path)
        quick = {"low_usage_duration_mins": 0.05, "high_usage_duration_mins": 0.05}
        fleet = dataclasses.replace(fleet, cfg=fleet.cfg.model_copy(update=quick))
        settings = world.settings.model_copy(
            update={"metrics_token": SecretStr(TOKEN), "api_token": SecretStr("api-token")}
        )
        app = create_app(
            settings, world.store, worker=WorkerConfig(poll_interval_s=0.1), fleet=fleet
        )
        server = serve(app)
        caps = ledger.SpendCaps(
            usd_to_micros(2.0), usd_to_micros(50.0), usd_to_micros(500.0), warn_at=0.8
        )

        def sweep() -> None:  # what `procure serve` runs (cap_warnings.run_warnings)
            while not stop.wait(0.5):
                cap_warnings.sweep(world.store, 0.8, caps, fleet.cfg)

        sweeper = threading.Thread(target=sweep, daemon=True)

        def start_runs() -> None:
            sweeper.start()
            world.new_run(budget=1.6)  # pays $1.40: past 80 %
            world.new_run(budget=5.0)  # vendor 1 fails at 30 %: vendor 2 finishes

        with mock.state.lock:
            nodes = [f"{i.ip}:{mock.state.config.node_port}" for i in mock.state.instances.values()]
        try:
            yield server.port, nodes, start_runs
        finally:
            stop.set()
            if sweeper.is_alive():
                sweeper.join(30)
            server.stop()
    finally:
        mock.stop()
        world.stop()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, demo: tuple[int, list[str], Callable[[], None]]
) -> None:
    serve_port, nodes, start_runs = demo
    config = local_config(tmp_path, serve_port, nodes)
    checked = promtool("check", "config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with running_prometheus(config, tmp_path) as prometheus:
        query = prometheus.query
        # Every target scraped with the token (a 401 would leave up == 0).
        targets = eventually(
            lambda: len(r := query('up{job=~"procure.*"} == 1')) == 1 + len(nodes) and r,
            "every target up",
        )
        assert {t["metric"]["job"] for t in targets} == {"procure", "procure-node"}
        start_runs()  # once scraped: the warnings' counters then increase, as in a live system
        for promql in dashboard_queries():
            expr = promql.replace("$__rate_interval", "30s")
            eventually(lambda e=expr: query(e), f"data for {expr}", within_s=90)
        # The warnings the demo crossed, as the alert rules see them.
        eventually(
            lambda: (
                {"run", "ledger"}
                <= {r["metric"]["scope"] for r in query("procure_budget_warnings_total > 0")}
            ),
            "run and ledger warnings in Prometheus",
            within_s=90,
        )
        eventually(lambda: query('ALERTS{alertname="ProcureBudgetWarning"}'), "the warning alert")
