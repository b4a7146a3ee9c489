"""`procure gpu-worker` and `procure tickets ...`: the GPU node (seed 003) from the command line."""

from __future__ import annotations

from typing import Annotated

import typer

from procure.cli.common import check_port, fail, level_named, print_json, settings_errors
from procure.numbers import number, whole
from procure.safetext import guard_logging

tickets_app = typer.Typer(
    help="Livepeer probabilistic tickets: winProb, payout spread, the winning check, and the "
    "orchestrator/gateway flag check. Amounts in wei, or with a unit: 18gwei, 0.001eth.",
    no_args_is_help=True,
)


def gpu_worker(
    port: Annotated[
        int, typer.Option(help="Port to listen on", parser=whole(1, 65535, "--port"))
    ] = 9876,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0 in a container)")] = (
        "127.0.0.1"
    ),
    log_level: Annotated[str, typer.Option(help="Logging level")] = "INFO",
) -> None:
    """Run the GPU node: /gpu-check (and /agent-net), /models, /metrics (dcgm-exporter names),
    /healthz, the dead-man lease, and registration with an orchestrator when ORCHESTRATOR_URL
    is set. Works without a GPU (it says so). See docs/gpu-node.md for its settings."""
    import logging

    import uvicorn

    from procure.gpu.service import create_gpu_worker_app
    from procure.gpu.settings import GpuWorkerSettings
    from procure.uvserver import GRACE_S

    logging.basicConfig(
        level=level_named(log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    guard_logging(log_level)
    with settings_errors():
        worker_settings = GpuWorkerSettings()
    check_port(host, port)  # before the app (its lease, its registration) starts
    app_ = create_gpu_worker_app(worker_settings, port=port, bind_host=host)
    # The grace bounds SIGTERM's wait for open requests: one stalled client must not keep the
    # lifespan (which stops the jobs and unregisters) from running.
    uvicorn.run(
        app_,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=GRACE_S,
    )


def _wei(text: str) -> int:
    """An amount in wei, at most 2^256-1; a huge exponent is refused before it is computed."""
    from procure.gpu.tickets import parse_wei
    from procure.numbers import UINT256_MAX, small_exponent

    try:
        wei = parse_wei(small_exponent(text))
    except ValueError as exc:
        fail(str(exc), code=2)
    if wei > UINT256_MAX:
        fail(f"{text[:40]!r} is more than 2^256-1 wei", code=2)
    return wei


@tickets_app.command("winprob")
def tickets_winprob(
    ticket_ev: Annotated[str, typer.Option(help="Expected value per ticket (-ticketEV)")],
    face_value: Annotated[str, typer.Option(help="Ticket face value")],
    jobs: Annotated[
        int,
        typer.Option(
            help="Jobs (tickets) to show the payout spread over",
            parser=whole(1, 10**9, "--jobs"),
        ),
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """winProb = ticketEV / faceValue as go-livepeer's 256-bit fixed point, and what a worker
    sees over N jobs: mean, standard deviation, chance of no win at all."""
    from procure.gpu import tickets

    ev, face = _wei(ticket_ev), _wei(face_value)
    try:
        fixed = tickets.win_prob(ev, face)
    except ValueError as exc:
        fail(str(exc))
    spread = tickets.payout(face, fixed, jobs)
    result = {
        "ticketEV": str(ev),
        "faceValue": str(face),
        "winProb": float(tickets.probability(fixed)),
        "winProbFixed": str(fixed),
        "winProbHex": hex(fixed),
        "expectedValueWei": str(round(tickets.expected_value(face, fixed), 6)),
        "payout": spread.to_json(),
    }
    if as_json:
        print_json(result)
        return
    typer.echo(
        f"winProb   {result['winProb']:.6g}  ({fixed} / 2^256-1)\n"
        f"EV        {result['expectedValueWei']} wei per ticket\n"
        f"{jobs} jobs: mean {spread.mean_wei:,.0f} wei, std {spread.std_wei:,.0f} wei, "
        f"no win at all with probability {spread.p_no_win:.3g}"
    )


@tickets_app.command("wins")
def tickets_wins(
    signature: Annotated[str, typer.Option(help="The ticket's signature, hex")],
    recipient_rand: Annotated[str, typer.Option(help="recipientRand, decimal or 0x hex")],
    win_prob: Annotated[
        float | None,
        typer.Option(help="winProb as a probability", parser=number(0, 1, "--win-prob")),
    ] = None,
    win_prob_fixed: Annotated[str | None, typer.Option(help="winProb, 256-bit integer")] = None,
) -> None:
    """Does the ticket win? uint256(keccak256(signature ‖ recipientRand)) < winProb.
    Exit status 0 when it wins, 1 when it does not."""
    from procure.gpu import tickets

    try:
        sig = bytes.fromhex(signature.removeprefix("0x"))
        rand = int(recipient_rand, 0)
        if (win_prob is None) == (win_prob_fixed is None):
            raise ValueError("give exactly one of --win-prob and --win-prob-fixed")
        fixed = tickets.to_fixed(win_prob) if win_prob is not None else int(str(win_prob_fixed), 0)
        won = tickets.wins(sig, rand, fixed)
    except ValueError as exc:
        fail(str(exc), code=2)
    typer.echo("winning ticket" if won else "not a winning ticket")
    raise typer.Exit(0 if won else 1)


@tickets_app.command("check")
def tickets_check(
    price_per_unit: Annotated[str, typer.Option(help="Orchestrator -pricePerUnit")] = (
        "100000000000000"
    ),
    ticket_ev: Annotated[str, typer.Option(help="Orchestrator -ticketEV")] = "29000000000000",
    face_value: Annotated[str, typer.Option(help="Orchestrator -maxFaceValue")] = (
        "1000000000000000"
    ),
    max_price_per_unit: Annotated[str, typer.Option(help="Gateway -maxPricePerUnit")] = (
        "130000000000000"
    ),
    max_ticket_ev: Annotated[str, typer.Option(help="Gateway -maxTicketEV")] = "300000000000000",
    max_face_value: Annotated[str, typer.Option(help="Gateway -maxFaceValue")] = (
        "1000000000000000"
    ),
    max_total_ev: Annotated[str, typer.Option(help="Gateway -maxTotalEV")] = "300000000000000",
    capability_price_per_unit: Annotated[
        str | None, typer.Option(help="CAPABILITY_PRICE_PER_UNIT (optional row)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object")] = False,
) -> None:
    """Orchestrator flags against gateway flags, as seed 003's table (defaults: the seed's
    numbers). Exit status 1 on any mismatch."""
    from procure.gpu import tickets

    checks = tickets.consistency(
        price_per_unit=_wei(price_per_unit),
        ticket_ev=_wei(ticket_ev),
        face_value=_wei(face_value),
        max_price_per_unit=_wei(max_price_per_unit),
        max_ticket_ev=_wei(max_ticket_ev),
        max_face_value=_wei(max_face_value),
        max_total_ev=_wei(max_total_ev),
        capability_price_per_unit=(
            None if capability_price_per_unit is None else _wei(capability_price_per_unit)
        ),
    )
    ok = all(c.ok for c in checks)
    try:
        p = float(tickets.probability(tickets.win_prob(_wei(ticket_ev), _wei(face_value))))
        note = f"winProb = ticketEV / faceValue = {p:.6g}"
    except ValueError:
        ok, note = False, "❌ ticketEV exceeds faceValue: winProb would be above 1"
    if as_json:
        print_json({"ok": ok, "checks": [c.to_json() for c in checks], "note": note})
    else:
        typer.echo(tickets.table(checks))
        typer.echo(note)
        typer.echo(
            "All orchestrator settings are within the gateway's ceilings."
            if ok
            else "Mismatch: the gateway will refuse this orchestrator's tickets or price."
        )
    if not ok:
        raise typer.Exit(1)
