"""A tiny real training job for procure's job runner: pure-Python SGD on a linear model, seconds
long, that checkpoints every k steps through fsspec and resumes from `PROCURE_RESUME_FROM`.

It speaks the runner's line protocol: `PROCURE_PROGRESS <0..1>` after each step and
`PROCURE_CHECKPOINT <url>` once a checkpoint is written whole. Run it by hand:

    PROCURE_CHECKPOINT_DIR=/tmp/ckpt python examples/train.py --steps 50 --step-time 0.05
    PROCURE_RESUME_FROM=/tmp/ckpt/step-000020.json python examples/train.py --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from typing import Any

import fsspec

TRUE_W, TRUE_B = 3.0, -2.0
BATCH = 16
stopping = False


def parse() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(env("TRAIN_STEPS", "50")))
    parser.add_argument("--step-time", type=float, default=float(env("TRAIN_STEP_S", "0.05")))
    parser.add_argument(
        "--checkpoint-every", type=int, default=int(env("TRAIN_CHECKPOINT_EVERY", "10"))
    )
    parser.add_argument("--lr", type=float, default=float(env("TRAIN_LR", "0.1")))
    parser.add_argument("--seed", type=int, default=int(env("TRAIN_SEED", "7")))
    parser.add_argument(
        "--fail-at-step",
        type=int,
        default=int(env("TRAIN_FAIL_AT_STEP", "0")),
        help="exit 1 at this step (0: never), to show a failure",
    )
    parser.add_argument("--checkpoint-dir", default=env("PROCURE_CHECKPOINT_DIR"))
    parser.add_argument("--resume-from", default=env("PROCURE_RESUME_FROM"))
    return parser.parse_args()


def batch(seed: int, step: int) -> list[tuple[float, float]]:
    # Seeded by step, so a resumed run sees the very batches the first run would have seen.
    rng = random.Random(seed * 1_000_003 + step)
    points = []
    for _ in range(BATCH):
        x = rng.uniform(-1, 1)
        points.append((x, TRUE_W * x + TRUE_B + rng.gauss(0, 0.1)))
    return points


def sgd_step(state: dict[str, Any], points: list[tuple[float, float]], lr: float) -> float:
    w, b = state["w"], state["b"]
    errors = [(w * x + b - y, x) for x, y in points]
    loss = sum(e * e for e, _ in errors) / len(errors)
    state["w"] = w - lr * 2 * sum(e * x for e, x in errors) / len(errors)
    state["b"] = b - lr * 2 * sum(e for e, _ in errors) / len(errors)
    return loss


def save(directory: str, state: dict[str, Any]) -> str:
    url = f"{directory.rstrip('/')}/step-{state['step']:06d}.json"
    data = json.dumps(state).encode()
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    # Written under a temporary name and moved, so no reader ever sees half a checkpoint.
    with fs.open(path + ".partial", "wb") as out:
        out.write(data)
    fs.mv(path + ".partial", path)
    print(f"PROCURE_CHECKPOINT {url}", flush=True)
    return url


def load(url: str) -> dict[str, Any]:
    with fsspec.open(url, "rb") as stream:
        state = json.loads(stream.read(1 << 20))
    if not isinstance(state, dict) or not {"step", "w", "b"} <= state.keys():
        raise SystemExit(f"not a checkpoint of this script: {url}")
    return state


def on_sigterm(_signum: int, _frame: Any) -> None:
    global stopping
    stopping = True  # finish the step, checkpoint, exit: a cancel or preemption loses nothing


def main() -> int:
    args = parse()
    signal.signal(signal.SIGTERM, on_sigterm)
    state: dict[str, Any] = {"step": 0, "w": 0.0, "b": 0.0, "loss": None}
    if args.resume_from:
        state = load(args.resume_from)
        print(f"resumed from step {state['step']} ({args.resume_from})", flush=True)
    print(
        f"training {args.steps} steps, lr {args.lr}, checkpoint every "
        f"{args.checkpoint_every} (pid {os.getpid()})"
    )
    last_saved = state["step"]
    while state["step"] < args.steps:
        step = state["step"] + 1
        if step == args.fail_at_step:
            print(f"step {step}: failing on purpose (--fail-at-step)", flush=True)
            return 1
        state["loss"] = sgd_step(state, batch(args.seed, step), args.lr)
        state["step"] = step
        print(f"step {step} loss {state['loss']:.6f}", flush=True)
        print(f"PROCURE_PROGRESS {step / args.steps:.4f}", flush=True)
        if args.checkpoint_dir and step % max(1, args.checkpoint_every) == 0:
            save(args.checkpoint_dir, state)
            last_saved = step
        if stopping:
            if args.checkpoint_dir and last_saved != step:
                save(args.checkpoint_dir, state)
            print(f"stopped at step {step} (SIGTERM)", flush=True)
            return 143
        time.sleep(args.step_time)
    if args.checkpoint_dir and last_saved != state["step"]:
        save(args.checkpoint_dir, state)
    print(f"done: w {state['w']:.4f} (true {TRUE_W}), b {state['b']:.4f} (true {TRUE_B})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
