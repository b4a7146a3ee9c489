"""The mock Vast.ai's JSON: offers as `POST /api/v0/bundles/` lists them and instances as
`GET /api/v0/instances/{id}/` and `GET /api/v1/instances/` show them (ports in Vast's object
form: the spec's `int[]` for showInstance is one of its known bugs)."""

from __future__ import annotations

from typing import Any

from procure.clouds.vast.mockstate import DEFAULT_DISK_GB, Machine, MockInstance, MockVastState

WRONG_IP = "127.255.255.254"  # nothing listens there (the wrong-ip fault)


def offer_json(
    state: MockVastState, m: Machine, now: float, *, bid: bool, disk_gb: float = DEFAULT_DISK_GB
) -> dict[str, Any]:
    """One ask, priced (`dph_total`) with the disk the search asked for (`allocated_storage`)."""
    price, min_bid = state.price(m, now), state.min_bid(m, now)
    disk = round(m.storage_per_hour(disk_gb), 6)
    gpu = min_bid if bid else price  # a bid search prices offers at their minimum bid
    dph = round(gpu + disk, 6)
    return {
        "id": m.ask_id,
        "ask_contract_id": m.ask_id,
        "bundle_id": m.ask_id + 900_000_000,
        "machine_id": m.machine_id,
        "host_id": 60_000 + m.ask_id % 1000,
        "gpu_name": m.gpu_name,
        "gpu_arch": "nvidia",
        "num_gpus": m.num_gpus,
        "gpu_ram": m.gpu_ram_mb,
        "gpu_total_ram": m.gpu_ram_mb * m.num_gpus,
        "gpu_frac": 1.0,
        "cpu_cores": 16 * m.num_gpus,
        "cpu_cores_effective": 16.0 * m.num_gpus,
        "cpu_ram": 65_536 * m.num_gpus,
        "disk_space": 500.0,
        "geolocation": m.geolocation,
        "direct_port_count": m.direct_port_count,
        "dph_base": round(price * 0.95, 6),
        "dph_total": dph,
        "min_bid": min_bid,
        "is_bid": bid,
        "rentable": True,
        "rented": False,
        "verified": True,
        "verification": "verified",
        "reliability": 0.995,
        "reliability2": 0.995,
        "static_ip": True,
        "public_ipaddr": f"203.0.113.{m.ask_id % 250 + 1}",
        "storage_cost": m.storage_cost,
        "storage_total_cost": disk,
        "inet_up_cost": 0.002,
        "inet_down_cost": 0.002,
        "search": {
            "gpuCostPerHour": gpu,
            "diskHour": disk,
            "totalHour": dph,
            "discountTotalHour": 0.0,
            "discountedTotalPerHour": dph,
        },
    }


def instance_json(
    state: MockVastState, inst: MockInstance, now: float, *, listing: bool
) -> dict[str, Any]:
    """One instance: `listing` for `GET /api/v1/instances/` (extra_env as pairs), else for
    `GET /api/v0/instances/{id}/` (extra_env as "K=V" strings), as the spec types them."""
    m = inst.machine
    actual = state.actual_status(inst, now)
    running = actual == "running" or (state.unknown_status and actual == "mystery_state")
    paused = actual in ("stopped", "offline")
    ip = WRONG_IP if state.wrong_ip else inst.ip or ""
    ports: dict[str, list[dict[str, str]]] | None = None
    if running and inst.ip:
        port = str(state.config.host_port)
        ports = {
            f"{p}/tcp": [{"HostIp": "0.0.0.0", "HostPort": port}] for p in inst.container_ports
        }
    env = [k for k in inst.env if not k.startswith("-")]
    started = state.unix(inst.created_at)
    return {
        "id": inst.id,
        "actual_status": actual,
        "intended_status": "running",
        "cur_state": "running" if not paused else "stopped",
        "next_state": "running" if not paused else "stopped",
        "status_msg": {"stopped": "outbid: paused", "offline": "host offline"}.get(actual or "")
        or ("" if running else "loading image"),
        "label": inst.label,
        "template_id": None,
        "image_uuid": inst.image,
        "image_args": [],
        "image_runtype": inst.runtype,
        "extra_env": [[k, inst.env[k]] for k in env]
        if listing
        else [f"{k}={inst.env[k]}" for k in env],
        "onstart": inst.onstart or ("" if listing else None),
        "jupyter_token": f"{inst.id:x}" * 4,
        "public_ipaddr": ip,
        "local_ipaddrs": "10.0.0.2",
        "ssh_host": "ssh5.vast.ai",
        "ssh_idx": "5",
        "ssh_port": 10_000 + inst.id % 50_000,
        "machine_id": m.machine_id,
        "start_date": started,
        "end_date": state.unix(now + 30 * 86400),
        "uptime_mins": round(state.running_s(inst, now) / 60, 3) if running else None,
        "duration": 30 * 86400.0,
        "cpu_cores": 16 * m.num_gpus,
        "cpu_ram": 65_536 * m.num_gpus,
        "gpu_name": m.gpu_name,
        "gpu_arch": "nvidia",
        "gpu_ram": m.gpu_ram_mb,
        "gpu_totalram": m.gpu_ram_mb * m.num_gpus,
        "gpu_util": 0.0 if running else None,
        "gpu_frac": 1.0,
        "disk_space": inst.disk_gb,
        "direct_port_count": m.direct_port_count,
        "direct_port_start": state.config.host_port,
        "direct_port_end": state.config.host_port + m.direct_port_count - 1,
        "ports": ports,
        "static_ip": True,
        "geolocation": m.geolocation,
        "verification": "verified",
        "rentable": True,
        "host_id": 60_000 + m.ask_id % 1000,
        "min_bid": inst.min_bid,
        "is_bid": inst.is_bid,
        "dph_base": round(inst.price * 0.95, 6),
        "dph_total": round(state.hourly(inst), 6),
        "num_gpus": m.num_gpus,
        "storage_cost": m.storage_cost,
        "client_run_time": round(state.running_s(inst, now), 3),
        "host_run_time": round(state.running_s(inst, now), 3),
        "time_remaining": "",
        "time_remaining_isbid": "",
    }


def charge_json(state: MockVastState, inst: MockInstance, now: float) -> dict[str, Any]:
    """The instance's contract row of `GET /api/v0/charges/` (amount rounded to 3 decimals)."""
    usd = state.billed_micros(inst, now) / 1_000_000
    end = min(t for t in (now, inst.destroyed_at) if t is not None)
    hours = state.running_s(inst, now) / 3600
    start, stop = int(state.unix(inst.created_at)), int(state.unix(end))
    return {
        "start": start,
        "end": stop,
        "type": "instance",
        "source": f"instance-{inst.id}",
        "description": f"Instance {inst.id} Charges",
        "amount": round(usd, 3),
        "metadata": {"label": inst.label},
        "items": [
            {
                "start": start,
                "end": stop,
                "type": "gpu",
                "source": None,
                "description": f"{hours:.3f} hours at ${inst.price:.3f}/hour",
                "amount": round(usd, 3),
                "metadata": {},
                "items": [],
            }
        ],
    }
