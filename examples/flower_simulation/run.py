"""Run the example Flower simulation with fedckpt checkpoints; resume it after a crash.

    python examples/flower_simulation/run.py --num-clients 10 --num-rounds 5 --checkpoint-dir ckpt

N clients (Flower SuperNodes on a local Ray, bound to 127.0.0.1) train an MLP on synthetic,
non-identically distributed data with FedAvg. Each client keeps a pre-aggregation checkpoint
(its locally trained model), a post-aggregation checkpoint (the global model it received) and its
state (optimizer momentum, step counter), restored at the start of each round in whichever Ray
worker runs it. The server keeps the latest and the best global model and its state per round.

Run it again with the same ``--checkpoint-dir`` after it was killed, at any moment, and it goes on
from the last round that was durably saved. ``--checkpointing sync`` saves the same checkpoints
with FL4Health's synchronous ``torch.save`` and ``none`` saves nothing (the baselines of
``benchmarks/flower_walltime.py``).

The last line of output is a JSON summary: rounds_completed, resumed_from_round,
checkpoints_written, blocked_seconds (time training waited on checkpointing: the clients' and the
server's) and sync_seconds_estimate (what synchronous ``torch.save`` calls of the same bytes would
have cost, from a calibration save at start), with the wall time and settings.
"""

from __future__ import annotations

import os
import sys

# Before Ray is imported: keep the simulation's Ray on loopback, and start a fresh local instance.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ADDRESS", "local")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep Ray's future default, silence its notice
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # Ray workers inherit it (Flower passes it on)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import client_app  # noqa: E402
import task  # noqa: E402
from checkpointing import MODES  # noqa: E402
from server_app import Options, Outcome, make_server_app  # noqa: E402


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--num-rounds", type=int, default=5)
    parser.add_argument("--checkpoint-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpointing", choices=MODES, default="fedckpt")
    parser.add_argument("--width", type=int, default=256, help="hidden width (2 layers: 4*width^2*2 bytes of weights)")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--simulated-accelerator-ms",
        type=float,
        default=0.0,
        help="SIMULATED accelerator-bound clients: each local step computes on one thread, then holds the "
        "host idle this long, as a GPU step would (there is no GPU here)",
    )
    args = parser.parse_args(argv)
    if args.num_clients < 2 or args.num_rounds < 1:
        parser.error("--num-clients must be at least 2 (FedAvg's minimum) and --num-rounds at least 1")
    directory = args.checkpoint_dir or tempfile.mkdtemp(prefix="fedckpt-flower-")
    return Options(
        num_clients=args.num_clients,
        num_rounds=args.num_rounds,
        checkpoint_dir=directory,
        checkpointing=args.checkpointing,
        seed=args.seed,
        width=args.width,
        depth=args.depth,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        simulated_accelerator_ms=args.simulated_accelerator_ms,
    )


def sync_seconds_per_byte(options: Options) -> float:
    """Calibration: how long a synchronous ``torch.save`` of the model takes here, per byte."""
    model = task.Net(options.width, options.depth)
    os.makedirs(options.checkpoint_dir, exist_ok=True)
    timings = []
    with tempfile.TemporaryDirectory(dir=options.checkpoint_dir) as scratch:
        for attempt in range(3):
            start = time.perf_counter()
            torch.save(model, os.path.join(scratch, f"calibration-{attempt}.pt"))
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) / task.model_bytes(model)


def summarize(options: Options, outcome: Outcome, wall_seconds: float, seconds_per_byte: float) -> dict:
    result = outcome.result
    assert result is not None
    this_run = [r for r in result.train_metrics_clientapp if r > outcome.resumed_from_round]

    def total(key: str) -> float:
        records = [result.train_metrics_clientapp, result.evaluate_metrics_clientapp]
        return sum(float(history[r][key]) for history in records for r in this_run if r in history)

    checkpoint_bytes = total("checkpoint-bytes") + outcome.server_checkpoint_bytes
    written = outcome.checkpoints_written
    if options.checkpointing == "sync":
        written += int(total("checkpoint-saves"))
    final_loss = result.evaluate_metrics_clientapp.get(max(result.evaluate_metrics_clientapp, default=0), {})
    return {
        "rounds_completed": max(result.train_metrics_clientapp, default=outcome.resumed_from_round),
        "resumed_from_round": outcome.resumed_from_round,
        "checkpoints_written": written,
        "blocked_seconds": round(total("fedckpt-blocked-s") + outcome.server_blocked_seconds, 4),
        "sync_seconds_estimate": round(checkpoint_bytes * seconds_per_byte, 4),
        "checkpoint_bytes": int(checkpoint_bytes),
        "bytes_written": outcome.bytes_written,
        "bytes_linked": outcome.bytes_linked,
        "wall_seconds": round(wall_seconds, 3),
        "final_loss": final_loss.get("loss"),
        "final_accuracy": final_loss.get("accuracy"),
        "checkpointing": options.checkpointing,
        "num_clients": options.num_clients,
        "num_rounds": options.num_rounds,
        "model_bytes": task.model_bytes(task.Net(options.width, options.depth)),
        "simulated_accelerator_ms": options.simulated_accelerator_ms,
        "checkpoint_dir": os.path.abspath(options.checkpoint_dir),
    }


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    seconds_per_byte = sync_seconds_per_byte(options)
    outcome = Outcome()
    start = time.perf_counter()
    run_simulation(
        server_app=make_server_app(options, outcome),
        client_app=client_app.app,
        num_supernodes=options.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": True},
        },
    )
    summary = summarize(options, outcome, time.perf_counter() - start, seconds_per_byte)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
