"""The default vendor registry (`procure vendors seed`) and each mock vendor's payee address."""

from __future__ import annotations

from eth_hash.auto import keccak

from procure.models import Vendor, usd_to_micros
from procure.payments.wallet import key_address


def vendor_payee(vendor_id: str) -> str:
    """A stable payee address per vendor id, so registry and mock agree without coordination."""
    # Derived without eth_account (about 0.6 s of CPU to import): `vendors seed` signs nothing
    return key_address(keccak(f"procure-mock-vendor:{vendor_id}".encode()))


def default_vendors(
    *,
    host: str = "http://localhost",
    ports: tuple[int, int] = (4001, 4002),
    network: str | None = None,
    asset: str | None = None,
    credential: str | None = None,
) -> list[Vendor]:
    """The seeds' two vendors: a cheap, less reliable one and a dearer, reliable one.

    `credential` is their bearer credential, already encrypted (`Keyring.encrypt`): the seeds'
    mock vendors share `GPU_VENDOR_SECRET`. A vendor registered later has its own."""
    specs = [
        ("gpu_vendor_1", "FastGPU", "1.40", 0.90, ["A10", "A100"], ports[0]),
        ("gpu_vendor_2", "SteadyCompute", "2.10", 0.97, ["A10", "A100", "H100"], ports[1]),
    ]
    return [
        Vendor(
            vendor_id=vendor_id,
            name=name,
            endpoint=f"{host}:{port}",
            base_price_per_hour=usd_to_micros(price),
            reliability_score=reliability,
            supported_gpu_types=gpus,
            pay_to=vendor_payee(vendor_id),
            network=network,
            asset=asset,
            credential=credential,
        )
        for vendor_id, name, price, reliability, gpus, port in specs
    ]
