"""NVIDIA's own dcgm-exporter dashboard, DeepOps' GPU dashboard and gpu-operator's DCGM recording
rules, kept verbatim under tests/data/dcgm/, against one real Prometheus scraping `gpu-worker` with
two simulated GPUs on dcgm-exporter's port 9400: every GPU panel's query, its template variables
resolved as Grafana resolves them, returns data with its legend's labels, and every recording rule
passes `promtool check rules` and records a series per GPU."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml

from procure.clouds.lambda_cloud.simnvml import SimGpu, sim_nvml
from procure.gpu.probe import nvml_reader
from procure.gpu.service import create_gpu_worker_app
from procure.gpu.settings import GpuWorkerSettings
from prometheus_harness import Prometheus, eventually, promtool, running_prometheus

DATA = Path(__file__).resolve().parent / "data" / "dcgm"
NVIDIA_DASHBOARD = DATA / "dcgm-exporter-dashboard.json"
DEEPOPS_DASHBOARD = DATA / "deepops-gpu-dashboard.json"
GPU_OPERATOR_RULES = DATA / "gpu-operator-prometheus-rule.yaml"
DCGM_PORT = 9400  # dcgm-exporter's port: DeepOps' dashboard finds its nodes by it
GPUS = {"0", "1"}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with its targets, rows' panels included (old and new dashboard schemas)."""
    found: list[dict[str, Any]] = []
    for panel in board.get("panels", []) + [p for r in board.get("rows", []) for p in r["panels"]]:
        found += panels(panel) if "panels" in panel else []
        if panel.get("targets"):
            found.append(panel)
    return found


def gpu_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that draw dcgm-exporter's metrics (DeepOps' node_exporter panels are not)."""
    return [p for p in panels(board) if any("DCGM_" in t["expr"] for t in p["targets"])]


def regex_escape(value: str) -> str:
    """Grafana's prometheusSpecialRegexEscape: a value inside a PromQL string used as a regex."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value)


def variable_values(prometheus: Prometheus, variable: dict[str, Any]) -> list[str]:
    """A query variable's options as Grafana computes them, from the live Prometheus."""
    query = variable["query"]
    if found := re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query):
        metric, label = found.groups()
        values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric}) or []
    elif found := re.fullmatch(r"query_result\((.*)\)", query):
        # Grafana writes each series as `name{label="value", ...} value timestamp` for the regex.
        values = [
            "{}{{{}}} {} {}".format(
                r["metric"].get("__name__", ""),
                ", ".join(f'{k}="{v}"' for k, v in r["metric"].items() if k != "__name__"),
                r["value"][1],
                r["value"][0],
            )
            for r in prometheus.query(found.group(1))
        ]
    else:
        raise AssertionError(f"a variable this test cannot resolve: {query}")
    if pattern := variable.get("regex"):
        extract = re.compile(pattern.strip("/"))
        values = [m.group(1) for v in values if (m := extract.match(v))]
    return sorted(set(values))


def interpolations(prometheus: Prometheus, board: dict[str, Any]) -> list[dict[str, str]]:
    """Each way the dashboard is drawn: one per value of a repeated variable, every multi-value
    variable at "All" (no allValue: Grafana writes the values as one regex alternation)."""
    choices: list[dict[str, str]] = [{}]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        values = variable_values(prometheus, variable)
        if not values:
            return []  # not scraped yet
        name = variable["name"]
        if variable.get("multi") or variable.get("includeAll"):
            escaped = [regex_escape(v) for v in values]
            text = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
            choices = [{**c, name: text} for c in choices]
        else:  # one value per drawing (DeepOps repeats its row per host)
            choices = [{**c, name: v} for c in choices for v in values]
    return choices


def interpolate(expr: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name]).replace(f"${{{name}}}", values[name])
    assert "$" not in expr.replace("$1", ""), f"an unresolved variable in {expr}"
    return expr


def legend_labels(target: dict[str, Any]) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat") or ""))


def node_socket() -> tuple[socket.socket, str]:
    """A listening socket on port 9400 of a loopback address of this test's own (127.0.0.0/8 is
    all loopback, so parallel tests each get one); any free port if 9400 is taken everywhere."""
    for _ in range(20):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, DCGM_PORT))
        except OSError:
            sock.close()
            continue
        sock.listen(128)
        return sock, f"{host}:{DCGM_PORT}"
    raise AssertionError("no loopback address had port 9400 free")


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`gpu-worker`'s app with two busy simulated H100s, as `procure gpu-worker --port 9400`
    serves it: its scrape target."""
    monkeypatch.delenv("PROCURE_METRICS_TOKEN", raising=False)
    monkeypatch.delenv("GPU_WORKER_TOKEN", raising=False)
    gpus = [
        SimGpu("NVIDIA H100 80GB HBM3", "GPU-a", 81559, 700, busy=True),
        SimGpu("NVIDIA H100 80GB HBM3", "GPU-b", 81559, 700, busy=True),
    ]
    settings = GpuWorkerSettings(GPU_WORKER_NVML_CACHE_S=0)
    app = create_gpu_worker_app(
        settings, read=nvml_reader(sim_nvml(lambda: gpus)), port=DCGM_PORT, hostname="gpu-node-1"
    )
    sock, target = node_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        eventually(lambda: server.started or not thread.is_alive(), "the node started", 15, 0.01)
        assert thread.is_alive(), "the node did not start"
        yield target
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def operator_rules(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """gpu-operator's PrometheusRule as Prometheus rule files: its groups unchanged, and a copy
    evaluated every second instead of every 30 s (the rules themselves unchanged) so the test
    waits seconds, not half a minute; and the names it records."""
    groups = yaml.safe_load(GPU_OPERATOR_RULES.read_text())["spec"]["groups"]
    verbatim = tmp_path / "gpu-operator-rules.yml"
    verbatim.write_text(yaml.safe_dump({"groups": groups}))
    fast = tmp_path / "gpu-operator-rules-1s.yml"
    fast.write_text(yaml.safe_dump({"groups": [{**g, "interval": "1s"} for g in groups]}))
    records = [r["record"] for g in groups for r in g["rules"] if "record" in r]
    return verbatim, fast, records


def test_gpu_operators_rules_pass_promtool(tmp_path: Path) -> None:
    verbatim, fast, records = operator_rules(tmp_path)
    assert len(records) == 7
    checked = promtool("check", "rules", str(verbatim), str(fast), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout


def test_nvidia_and_deepops_panels_and_gpu_operators_rules_show_data(
    tmp_path: Path, node: str
) -> None:
    _, rules, records = operator_rules(tmp_path)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(rules))}]\n"
        "scrape_configs:\n"
        f"  - job_name: dcgm\n    static_configs: [{{targets: [{json.dumps(node)}]}}]\n"
    )
    nvidia = json.loads(NVIDIA_DASHBOARD.read_text())
    deepops = json.loads(DEEPOPS_DASHBOARD.read_text())
    assert len(gpu_panels(nvidia)) == 8 and len(gpu_panels(deepops)) == 13  # the fixtures' count
    with running_prometheus(config, tmp_path) as prometheus:
        for board in (nvidia, deepops):
            drawings = eventually(
                lambda b=board: interpolations(prometheus, b), f"{board['title']}'s variables"
            )
            if board is deepops:  # its server list: the node's address without dcgm's port
                assert [d["hostname"] for d in drawings] == [node.rsplit(":", 1)[0]]
            for values in drawings:
                for panel in gpu_panels(board):
                    for target in panel["targets"]:
                        check_target(prometheus, board, panel, target, values)
        for record in records:
            series = eventually(
                lambda r=record: prometheus.query(f'{r}{{vendor="nvidia"}}'), f"series of {record}"
            )
            assert {s["metric"]["gpu"] for s in series} == GPUS, record
            assert {s["metric"]["UUID"] for s in series} == {"GPU-a", "GPU-b"}, record


def check_target(
    prometheus: Prometheus,
    board: dict[str, Any],
    panel: dict[str, Any],
    target: dict[str, Any],
    values: dict[str, str],
) -> None:
    """The panel shows data, and each series has the labels its legend names."""
    expr = interpolate(target["expr"], values)
    what = f"{board['title']} / {panel['title']}: {expr}"
    series = eventually(lambda: prometheus.query(expr), f"data for {what}")
    assert all(s["value"][1] not in ("NaN", "+Inf", "-Inf") for s in series), what
    labels = legend_labels(target)
    for one in series:
        assert all(one["metric"].get(label) for label in labels), (what, one["metric"])
    if "gpu" in labels:  # a line per GPU, each named by its index
        assert {s["metric"]["gpu"] for s in series} == GPUS, what
