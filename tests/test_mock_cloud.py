"""The mock Lambda Cloud over real HTTP on loopback: its answers validate against Lambda's own
OpenAPI document (so the client and the mock cannot drift from the real API together), its
instances run real GPU nodes whose figures follow the workload placed on them, faults show as
Lambda shows them, and a node whose controller lease lapses terminates its own instance."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from procure.clouds.lambda_cloud.mock import MockCloud, start_mock_cloud
from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
from procure.clouds.mockworld.nodes import bind_loopback
from procure.clouds.mockworld.workload import JobSpec, WorkloadError, parse_csv, synthetic
from procure.clouds.specs import validate_answer
from procure.local import free_port

KEY = "mock-key-for-tests"
NODE_TOKEN = "node-token"


def validate(path: str, method: str, response: httpx.Response) -> None:
    """`response` against the schema Lambda's spec (inside the package) gives for this path,
    method and status."""
    validate_answer("lambda", method, path, response.status_code, response.json())


def eventually(condition: Callable[[], Any], what: str, within_s: float = 15) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


@pytest.fixture
def cloud() -> Iterator[MockCloud]:
    # speed 0: simulated time moves only when a test advances it, so nothing depends on timing.
    mock = start_mock_cloud(
        MockCloudConfig(
            api_key=KEY,
            speed=0,
            boot_s=120,
            node_port=free_port(),
            node_token=NODE_TOKEN,
            quota=3,
            capacity={"gpu_1x_a100": {"us-west-1": 2}, "gpu_8x_a100": {"us-east-1": 1}},
        )
    )
    yield mock
    mock.stop()


@pytest.fixture
def api(cloud: MockCloud) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=cloud.url, headers=headers, timeout=10) as client:
        yield client


LAUNCH = "/api/v1/instance-operations/launch"
TERMINATE = "/api/v1/instance-operations/terminate"


def launch(api: httpx.Client, name: str = "a", kind: str = "gpu_1x_a100") -> httpx.Response:
    region = "us-east-1" if kind.startswith("gpu_8x") else "us-west-1"
    body = {"region_name": region, "instance_type_name": kind, "ssh_key_names": ["me"]}
    return api.post(LAUNCH, json=body | {"name": name})


def boot(cloud: MockCloud, api: httpx.Client, instance_id: str) -> dict[str, Any]:
    """Advance past the boot delay; the instance, active and with its node answering."""
    api.post("/admin/clock", json={"advance_s": 121}).raise_for_status()

    def up() -> dict[str, Any] | None:
        data = api.get(f"/api/v1/instances/{instance_id}").json()["data"]
        return data if data["status"] == "active" and data.get("ip") else None

    return eventually(up, "the instance is active with an ip")


def node(cloud: MockCloud, ip: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://{ip}:{cloud.state.config.node_port}",
        headers={"Authorization": f"Bearer {NODE_TOKEN}"},
        timeout=10,
    )


def test_every_answer_matches_lambdas_openapi_schema(cloud: MockCloud, api: httpx.Client) -> None:
    types = api.get("/api/v1/instance-types")
    validate("/api/v1/instance-types", "get", types)
    assert types.json()["data"]["gpu_1x_a100"]["instance_type"]["price_cents_per_hour"] == 129

    launched = launch(api)
    validate(LAUNCH, "post", launched)
    instance_id = launched.json()["data"]["instance_ids"][0]
    booting = api.get("/api/v1/instances")
    validate("/api/v1/instances", "get", booting)
    assert booting.json()["data"][0]["status"] == "booting"

    boot(cloud, api, instance_id)
    one = api.get(f"/api/v1/instances/{instance_id}")
    validate("/api/v1/instances/{id}", "get", one)
    validate("/api/v1/instances", "get", api.get("/api/v1/instances"))

    ended = api.post(TERMINATE, json={"instance_ids": [instance_id]})
    validate(TERMINATE, "post", ended)
    assert ended.json()["data"]["terminated_instances"][0]["status"] == "terminating"

    # Errors, each in the schema the spec gives for its status.
    unknown = api.get("/api/v1/instances/0123456789abcdef")
    assert unknown.status_code == 404
    validate("/api/v1/instances/{id}", "get", unknown)
    wrong_key = api.get("/api/v1/instances", headers={"Authorization": "Bearer nope"})
    assert wrong_key.status_code == 401
    assert wrong_key.json()["error"]["code"] == "global/invalid-api-key"
    validate("/api/v1/instances", "get", wrong_key)
    bad = api.post(LAUNCH, json={"region_name": "us-west-1"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "global/invalid-parameters")
    validate(LAUNCH, "post", bad)
    api.post("/admin/faults", json={"refuse_capacity": True}).raise_for_status()
    refused = launch(api)
    assert refused.json()["error"]["code"] == "instance-operations/launch/insufficient-capacity"
    validate(LAUNCH, "post", refused)
    assert (
        api.get("/api/v1/instance-types").json()["data"]["gpu_1x_a100"][
            "regions_with_capacity_available"
        ]
        == []
    )
    api.post("/admin/faults", json={"refuse_quota": True}).raise_for_status()
    quota = launch(api)
    assert quota.json()["error"]["code"] == "global/quota-exceeded"
    validate(LAUNCH, "post", quota)


def test_capacity_and_quota_are_real_limits(cloud: MockCloud, api: httpx.Client) -> None:
    assert launch(api, "a").status_code == 200
    assert launch(api, "b").status_code == 200
    full = launch(api, "c")  # two gpu_1x_a100 fit us-west-1
    assert full.json()["error"]["code"] == "instance-operations/launch/insufficient-capacity"
    regions = api.get("/api/v1/instance-types").json()["data"]
    assert regions["gpu_1x_a100"]["regions_with_capacity_available"] == []
    assert launch(api, "d", "gpu_8x_a100").status_code == 200
    over = launch(api, "e", "gpu_8x_a100")  # quota 3 instances
    assert over.json()["error"]["code"] == "global/quota-exceeded"


def test_placed_work_drives_the_nodes_figures_and_the_queue(
    cloud: MockCloud, api: httpx.Client
) -> None:
    csv = "submit_s,gpus,duration_s\n0,1,600\n0,1,600\n30,1,600\n"
    assert api.post("/admin/workload", json={"csv": csv}).json()["jobs"] == 3
    instance_id = launch(api).json()["data"]["instance_ids"][0]
    ip = boot(cloud, api, instance_id)["ip"]
    with node(cloud, ip) as gpu:
        check = gpu.post("/gpu-check", json={"agent_id": "fleet"}).json()
        assert check["gpu_count"] == 1
        assert check["gpus"][0]["utilization_gpu_pct"] >= 90
        assert check["gpus"][0]["name"] == "NVIDIA A100-PCIE-40GB"
        metrics = gpu.get("/metrics").text
        assert any(
            line.startswith("DCGM_FI_DEV_GPU_UTIL{") and float(line.split()[-1]) >= 90
            for line in metrics.splitlines()
        )
    queue = api.get("/admin/queue").json()
    # One GPU for three jobs: one runs, two wait; the first waited the whole boot.
    assert (queue["running"], queue["queued"], queue["gpus_busy"]) == (1, 2, 1)
    assert queue["utilisation"] == 1.0
    assert queue["wait_max_s"] >= 120

    # Past all three jobs (600 s each, in turn): the GPU falls idle and says so.
    api.post("/admin/clock", json={"advance_s": 1900}).raise_for_status()
    queue = api.get("/admin/queue").json()
    assert (queue["completed"], queue["queued"], queue["running"]) == (3, 0, 0)
    assert queue["wait_p95_s"] >= 1200  # the third job waited for the first two
    with node(cloud, ip) as gpu:
        assert (
            gpu.post("/gpu-check", json={"agent_id": "f"}).json()["gpus"][0]["utilization_gpu_pct"]
            == 0
        )


def test_preemption_ends_the_node_and_requeues_its_job(cloud: MockCloud, api: httpx.Client) -> None:
    api.post("/admin/workload", json={"csv": "0,1,3600\n"}).raise_for_status()
    instance_id = launch(api).json()["data"]["instance_ids"][0]
    ip = boot(cloud, api, instance_id)["ip"]
    assert api.get("/admin/queue").json()["running"] == 1
    preempted = api.post(f"/admin/instances/{instance_id}/preempt").json()
    assert preempted["status"] == "preempted"
    listed = api.get("/api/v1/instances").json()["data"]
    assert [i["status"] for i in listed] == ["preempted"]
    queue = api.get("/admin/queue").json()
    assert (queue["queued"], queue["running"], queue["restarts"]) == (1, 0, 1)

    def node_gone() -> bool:
        try:
            with node(cloud, ip) as gpu:
                gpu.get("/healthz")
        except httpx.TransportError:
            return True
        return False

    eventually(node_gone, "the preempted instance's node stops answering")


def test_an_unhealthy_instance_reports_a_lost_gpu_and_stalls_its_job(
    cloud: MockCloud, api: httpx.Client
) -> None:
    api.post("/admin/workload", json={"csv": "0,1,600\n"}).raise_for_status()
    instance_id = launch(api).json()["data"]["instance_ids"][0]
    ip = boot(cloud, api, instance_id)["ip"]
    api.post(f"/admin/instances/{instance_id}/unhealthy").raise_for_status()
    assert api.get(f"/api/v1/instances/{instance_id}").json()["data"]["status"] == "unhealthy"
    api.post("/admin/clock", json={"advance_s": 3600}).raise_for_status()
    assert api.get("/admin/queue").json()["completed"] == 0  # stalled, never finishes
    with node(cloud, ip) as gpu:
        gpus = gpu.post("/gpu-check", json={"agent_id": "f"}).json()["gpus"]
        assert "lost" in gpus[0]["error"]


def test_a_lapsed_lease_makes_the_node_terminate_its_own_instance(
    cloud: MockCloud, api: httpx.Client
) -> None:
    instance_id = launch(api).json()["data"]["instance_ids"][0]
    ip = boot(cloud, api, instance_id)["ip"]
    with node(cloud, ip) as gpu:
        armed = gpu.post("/lease", json={"ttl_s": 0.3, "holder": "fleet-controller"})
        assert armed.json()["state"] == "armed"
    # The controller never renews (it died): the node's stop action calls terminate.

    def status() -> str | None:
        data = api.get(f"/api/v1/instances/{instance_id}").json()["data"]
        return data["status"] if data["status"] == "terminating" else None

    eventually(status, "the orphaned instance terminates itself", within_s=30)
    assert cloud.figures()["instances"] == {"terminating": 1}


def test_admin_and_api_refuse_a_wrong_key_and_bad_workloads(api: httpx.Client) -> None:
    assert api.get("/admin/queue", headers={"Authorization": "Bearer x"}).status_code == 401
    bad = api.post("/admin/workload", json={"csv": "0,one,10\n"})
    assert bad.status_code == 400 and "line 1" in bad.json()["error"]["message"]
    basic = httpx.BasicAuth(KEY, "")
    assert api.get("/api/v1/instances", headers={"Authorization": ""}, auth=basic).is_success


def test_workloads_parse_strictly_and_generate_reproducibly() -> None:
    jobs = parse_csv("submit_s,gpus,duration_s\n# a comment\n5,1,60\n0,2,30\n\n")
    assert jobs == [JobSpec(0.0, 2, 30.0), JobSpec(5.0, 1, 60.0)]
    for bad in ("1,2\n", "-1,1,10\n", "0,0,10\n", "0,1,nan\n", "0,1,0\n"):
        with pytest.raises(WorkloadError):
            parse_csv(bad)
    day = synthetic(7)
    assert day == synthetic(7) and day != synthetic(8)
    assert all(0 <= j.submit_s < 86_400 and 60 <= j.duration_s <= 6 * 3600 for j in day)
    # Diurnal: the busiest hours (around the 14:00 peak) see more arrivals than the night.
    afternoon = sum(1 for j in synthetic(7, bursts=0) if 12 <= j.submit_s / 3600 < 16)
    night = sum(1 for j in synthetic(7, bursts=0) if 0 <= j.submit_s / 3600 < 4)
    assert afternoon > night


def test_two_nodes_starting_at_once_never_share_an_address() -> None:
    """Two mock clouds (two tests side by side) starting a node on the same port at once: the
    second must get the next loopback address, not a socket whose listen then fails (it did:
    with SO_REUSEADDR both could bind 127.0.0.2 until one listened)."""
    first_ip, first = bind_loopback(set(), 2, free_port())
    try:
        port = first.getsockname()[1]
        second_ip, second = bind_loopback(set(), 2, port)
        second.close()
    finally:
        first.close()
    assert first_ip != second_ip
