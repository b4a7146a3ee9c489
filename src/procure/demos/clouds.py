"""`procure demo clouds`: the agent on three mock clouds (Lambda, RunPod, Vast.ai) and one x402
vendor — a `procure gateway` selling the mock Lambda account — in one process on the embedded
store. The cheapest interruptible offer (a Vast.ai bid) is taken, its host is lost part-way, and
the job resumes from its checkpoint on another cloud."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from procure.agent.runtime import close_deps, make_deps
from procure.agent.tick import tick
from procure.demos.settings import demo_settings
from procure.local import free_port, start_facilitator
from procure.models import (
    TERMINAL_RUN_STATUSES,
    CloudTerms,
    JobSpec,
    PaymentStatus,
    Vendor,
    usd_to_micros,
)
from procure.payments.wallet import load_or_create_account
from procure.safetext import safe
from procure.settings import Settings
from procure.store import Store, cloud_repo, open_store, repo
from procure.vendors.credentials import Keyring

TRAIN = Path(__file__).resolve().parents[3] / "examples" / "train.py"
STEPS, STEP_S = 120, 0.05  # the job: 6 s of work, a checkpoint every few steps
STYLE = {
    "agent_reasoning": "cyan",
    "payment_event": "green",
    "job_log": "white",
    "job_event": "blue",
    "error": "bold red",
}


@dataclasses.dataclass
class MockClouds:
    mocks: dict[str, Any]  # provider -> MockCloud (lambda, runpod, vast)
    keys: dict[str, str]

    def admin(
        self, provider: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> Any:
        mock = self.mocks[provider]
        answer = httpx.request(
            method,
            f"{mock.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.keys[provider]}"},
            timeout=15,
        )
        answer.raise_for_status()
        return answer.json()

    def billed(self) -> int:
        return sum(self.admin(p, "GET", "/admin/billing")["totalMicroUsd"] for p in self.mocks)

    def stop(self) -> None:
        for mock in self.mocks.values():
            mock.stop()


def start_clouds() -> MockClouds:
    """The three mock clouds on loopback, booting in a fraction of a second (no random preemption:
    the demo loses its host on purpose)."""
    from procure.clouds.lambda_cloud.mock import start_mock_cloud as start_lambda
    from procure.clouds.lambda_cloud.mockstate import MockCloudConfig
    from procure.clouds.runpod.mock import start_mock_cloud as start_runpod
    from procure.clouds.runpod.mockstate import RunPodMockConfig
    from procure.clouds.vast.mock import start_mock_cloud as start_vast
    from procure.clouds.vast.mockstate import MockVastConfig

    lam = start_lambda(MockCloudConfig(speed=1, boot_s=0.3, terminate_s=0.1, node_port=free_port()))
    runpod = start_runpod(
        RunPodMockConfig(speed=1, provision_s=0.2, start_s=0.2, node_port=free_port())
    )
    vast = start_vast(MockVastConfig(boot_s=0.3, rate_scale=0, outbid_per_hour=0))
    return MockClouds(
        {"lambda": lam, "runpod": runpod, "vast": vast},
        {
            "lambda": lam.state.config.api_key,
            "runpod": runpod.state.config.api_key,
            "vast": vast.api_key,
        },
    )


def clients(clouds: MockClouds) -> dict[str, Any]:
    from procure.clouds.lambda_cloud.client import LambdaCloud
    from procure.clouds.lambda_cloud.settings import LambdaSettings
    from procure.clouds.runpod.client import RunPodCloud
    from procure.clouds.runpod.settings import RunPodSettings
    from procure.clouds.vast.client import VastCloud
    from procure.clouds.vast.settings import VastSettings

    m, k = clouds.mocks, clouds.keys
    return {
        "lambda": LambdaCloud(
            LambdaSettings(
                LAMBDA_API_KEY=k["lambda"],
                LAMBDA_API_URL=m["lambda"].url,
                LAMBDA_NODE_PORT=m["lambda"].state.config.node_port,
            )
        ),
        "runpod": RunPodCloud(
            RunPodSettings(RUNPOD_API_KEY=k["runpod"], RUNPOD_API_URL=m["runpod"].url)
        ),
        "vast": VastCloud(VastSettings(VAST_API_KEY=k["vast"], VAST_API_URL=m["vast"].url)),
    }


def cloud_vendors() -> list[Vendor]:
    def vendor(provider: str, max_usd: float, *, spot: bool = False) -> Vendor:
        return Vendor(
            vendor_id=f"{provider}-a100" + ("-spot" if spot else ""),
            name=f"{provider} A100" + (" (spot)" if spot else ""),
            endpoint=f"cloud:{provider}",
            base_price_per_hour=usd_to_micros(max_usd),
            reliability_score=0.95,
            supported_gpu_types=["A100"],
            kind="cloud",
            cloud=CloudTerms(
                provider=provider,  # type: ignore[arg-type]
                gpu="A100",
                max_price_per_hour=usd_to_micros(max_usd),
                spot=spot,
            ),
        )

    return [vendor("vast", 1.0, spot=True), vendor("runpod", 2.0), vendor("lambda", 2.0)]


def start_demo_gateway(
    clouds: MockClouds, store: Store, facilitator_url: str, secret: str, workdir: Path
) -> tuple[Vendor, Any]:
    """`procure gateway --cloud lambda` on loopback, and the vendor the agent knows it by."""
    from procure.gateway.serve import gateway_config, start_gateway

    command = (sys.executable, str(TRAIN), "--steps", str(STEPS), "--step-time", str(STEP_S))
    cfg = gateway_config(
        vendor_id="lambda_gateway",
        provider="lambda",
        facilitator_url=facilitator_url,
        secret=secret,
        home=workdir / "gateway",
        command=command,
        checkpoint_dir=str(workdir / "checkpoints"),
        hour_s=60.0,
        poll_s=0.2,
        gpus=("A100",),
    )
    server = start_gateway(cfg, store, clients(clouds)["lambda"], facilitator_url)
    vendor = Vendor(
        vendor_id="lambda_gateway",
        name="Lambda A100 via x402 gateway",
        endpoint=server.url,
        base_price_per_hour=usd_to_micros(1.29 * 1.1),
        reliability_score=0.95,
        supported_gpu_types=["A100"],
        pay_to=cfg.pay_to,
        network=cfg.network,
        asset=cfg.asset,
    )
    return vendor, server


def run_cloud_demo(
    *, workdir: Path | None = None, console: Console | None = None, budget: float = 5.0
) -> dict[str, Any]:
    """The story; returns the summary `--json` prints."""
    console = console or Console()
    started = time.monotonic()
    if not TRAIN.exists():
        raise RuntimeError(f"{TRAIN} is missing: run the demo from a checkout of procure")
    own = workdir is None  # a folder of our own (it holds a wallet key): removed at the end
    workdir = workdir or Path(tempfile.mkdtemp(prefix="procure-clouds-"))
    secret = "demo-secret"
    facilitator = start_facilitator(workdir / "chain-journal.jsonl")
    chain = facilitator.app.state.chain
    settings = demo_settings(workdir, facilitator.url, secret)
    servers: list[Any] = [facilitator]
    clouds = start_clouds()
    try:
        store = open_store(settings.database_url)
        # One x402 vendor beside the clouds: a gateway selling the mock Lambda account, its
        # price the live offer plus 10 %.
        x402, server = start_demo_gateway(clouds, store, facilitator.url, secret, workdir)
        servers.append(server)
        x402.credential = Keyring.load(settings.home).encrypt(secret)
        vendors = [*cloud_vendors(), x402]
        with store.session() as s:
            for vendor in vendors:
                repo.save_vendor(s, vendor)
        wallet = load_or_create_account(None, workdir).address
        chain.mint(wallet, usd_to_micros(settings.wallet_funding_usd))
        console.rule("[bold]procure demo clouds")
        for provider, mock in clouds.mocks.items():
            console.print(f"mock {provider:<7} {mock.url}")
        console.print(
            f"x402 vendor {x402.vendor_id} {x402.endpoint} (a procure gateway in front of the "
            f"mock Lambda), ${x402.base_price_per_hour / 1e6:.2f}/h"
        )
        with store.session() as s:
            run = repo.create_run(
                s,
                user_id="demo-user",
                goal="Fine-tune tiny-llm on an A100, cheapest first",
                budget_total=usd_to_micros(budget),
                job_spec=JobSpec(gpu_type="A100", hours=1.0, checkpoint_every=0.1),
            )
        console.print(f"run {run.id}: budget ${budget:.2f}")
        console.rule("trace")
        summary = asyncio.run(_drive(settings, store, run.id, clouds, workdir, console))
        summary["seconds"] = round(time.monotonic() - started, 1)
        return summary
    finally:
        clouds.stop()
        for srv in reversed(servers):
            srv.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


async def _drive(
    settings: Settings,
    store: Store,
    run_id: str,
    clouds: MockClouds,
    workdir: Path,
    console: Console,
) -> dict[str, Any]:
    rental = clients(clouds)
    deps = make_deps(settings, store, clouds=rental)
    command = (sys.executable, str(TRAIN), "--steps", str(STEPS), "--step-time", str(STEP_S))
    tuning = dataclasses.replace(
        deps.cloud,
        command=command,
        checkpoint_dir=str(workdir / "checkpoints"),
        boot_timeout_s=30.0,
        reserve_ahead_s=10.0,
    )
    deps = dataclasses.replace(deps, cloud=tuning)
    seen, preempted = 0, 0
    deadline = time.monotonic() + 50
    try:
        while True:
            await tick(deps, run_id)
            with store.session() as s:
                new = repo.list_observations(s, run_id, after_id=seen)
                state = repo.load_state(s, run_id, observations=False)
                instances = cloud_repo.instances_of_run(s, run_id)
            for obs in new:
                seen = obs.id
                if obs.type == "job_log" and obs.content.startswith("PROCURE_"):
                    continue  # the job's progress protocol: shown as job events instead
                style = STYLE.get(obs.type, "white")
                console.print(f"[{style}]{obs.type:>15}[/] {safe(obs.content, one_line=False)}")
            assert state is not None
            if state.run.status in TERMINAL_RUN_STATUSES:
                break
            spot = next((i for i in instances if i.provider == "vast" and i.instance_id), None)
            halfway = any(j.checkpoint_progress >= 0.5 for j in state.jobs)
            if not preempted and spot is not None and spot.status == "running" and halfway:
                # The bid's host dies and Vast.ai has no other A100 to bid on: procure notices at
                # its next poll and resumes elsewhere.
                path = f"/admin/instances/{spot.instance_id}/preempt"
                await asyncio.to_thread(clouds.admin, "vast", "POST", path)
                await asyncio.to_thread(
                    clouds.admin, "vast", "POST", "/admin/capacity", {"count": 0, "gpu": "A100"}
                )
                console.print(
                    f"[bold yellow]{'cloud':>15}[/] vast instance {spot.instance_id} preempted"
                )
                preempted += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish in time")
            await asyncio.sleep(0.1)
        left = 0
        for client in rental.values():
            left += len([i for i in await client.labelled() if i.status != "terminated"])
    finally:
        await close_deps(deps)
    with store.session() as s:
        state = repo.load_state(s, run_id, observations=False)
        instances = cloud_repo.instances_of_run(s, run_id)
    assert state is not None
    billed = await asyncio.to_thread(clouds.billed)
    cloud_jobs = {i.job_id for i in instances}
    booked = sum(
        p.amount
        for p in state.payments
        if p.status == PaymentStatus.completed and p.job_id in cloud_jobs
    )
    resumed = max((j.start_progress for j in state.jobs), default=0.0)
    summary = {
        "status": str(state.run.status),
        "runId": run_id,
        "providers": sorted(clouds.mocks),
        "instances_launched": len([i for i in instances if i.instance_id]),
        "instances_left_running": left,
        "preemptions": len([i for i in instances if "preempt" in (i.end_reason or "")]),
        "resumed_from_progress": round(resumed, 3),
        "booked_usd": round(booked / 1e6, 6),
        "billed_usd": round(billed / 1e6, 6),
        "jobs": [
            {"vendorId": j.vendor_id, "status": str(j.status), "startProgress": j.start_progress}
            for j in state.jobs
        ],
    }
    console.rule("summary")
    for i in instances:
        console.print(
            f"{i.provider:<7} {safe(i.instance_id or '-', 40):<12} {i.status:<11} "
            f"{safe(i.end_reason or '', 80)} billed ${(i.billed or 0) / 1e6:.4f}"
        )
    console.print(
        f"run {state.run.status}; booked ${booked / 1e6:.4f} for cloud time, the clouds billed "
        f"${billed / 1e6:.4f}; {left} instance(s) left running"
    )
    return summary
