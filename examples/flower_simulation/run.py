"""Run the example Flower simulation with fedckpt checkpoints; resume it after a crash.

    python examples/flower_simulation/run.py --num-clients 10 --num-rounds 5 --checkpoint-dir ckpt

N clients (Flower SuperNodes on a local Ray, bound to 127.0.0.1) train an MLP on synthetic,
non-identically distributed data with FedAvg. Each client keeps a pre-aggregation checkpoint
(its locally trained model), a post-aggregation checkpoint (the global model it received) and its
state (optimizer momentum, step counter), restored at the start of each round in whichever Ray
worker runs it. The server keeps the latest and the best global model and its state per round.

Run it again with the same ``--checkpoint-dir`` after it was killed, at any moment, and it goes on
from the last round that was durably saved. The apps read that directory from Flower's run config
(``context.run_config["checkpoint-dir"]``, declared in this directory's pyproject.toml).

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
APP_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, APP_DIR)  # Ray workers inherit it (Flower passes it on)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

import client_app  # noqa: E402
import task  # noqa: E402
from flower_run import run_simulation_with_config  # noqa: E402
from server_app import Options, Outcome, make_server_app  # noqa: E402


def parse_options(argv: list[str] | None = None) -> tuple[Options, str]:
    """The run's settings and its checkpoint directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--num-rounds", type=int, default=5)
    parser.add_argument("--checkpoint-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--seed", type=int, default=0)
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
    parser.add_argument(
        "--num-gpus-per-client",
        type=float,
        default=0.0,
        help="each client's share of a GPU (Flower's client_resources num_gpus; 0.25: four clients per GPU), "
        "trained on it; fedckpt copies their checkpoints from the GPU (default 0: CPU clients)",
    )
    parser.add_argument(
        "--keep-rounds", type=int, default=0,
        help="keep the N newest rounds of every checkpoint (fedckpt.retention.LatestN), so that a run can be "
        "resumed from any complete round (default 0: one file per checkpoint, overwritten every round)",
    )  # fmt: skip
    parser.add_argument(
        "--resume-round", type=int, default=None, metavar="R",
        help="with --keep-rounds: restart from complete round R (0: the newest complete round); later rounds "
        "kept are those of the run it abandons, and are deleted (fedckpt ls --rounds DIR lists the rounds)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.resume_round is not None and (args.keep_rounds < 1 or args.resume_round < 0):
        parser.error("--resume-round needs --keep-rounds (rounds are kept only then) and a round >= 0")
    if args.num_clients < 2 or args.num_rounds < 1:
        parser.error("--num-clients must be at least 2 (FedAvg's minimum) and --num-rounds at least 1")
    if not 0 <= args.num_gpus_per_client <= 1:
        parser.error("--num-gpus-per-client is a share of one GPU, from 0 to 1")
    if args.num_gpus_per_client and not torch.cuda.is_available():
        parser.error("--num-gpus-per-client needs a CUDA device, and torch sees none here")
    options = Options(
        num_clients=args.num_clients,
        num_rounds=args.num_rounds,
        seed=args.seed,
        width=args.width,
        depth=args.depth,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        simulated_accelerator_ms=args.simulated_accelerator_ms,
        num_gpus_per_client=args.num_gpus_per_client,
        keep_rounds=args.keep_rounds,
        resume_round=args.resume_round,
    )
    directory = args.checkpoint_dir or tempfile.mkdtemp(prefix="fedckpt-flower-")
    # A URL (s3://bucket/run, with the AWS environment variables) stays as it is.
    return options, directory if "://" in directory else os.path.abspath(directory)


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    run_config: dict[str, str],
    num_gpus: float = 0.0,
) -> None:
    """Flower's simulation of the two apps in this process, with ``run_config`` as the run config's
    overrides (``flwr run --run-config``): see ``flower_run.py`` for why not ``run_simulation``."""
    run_simulation_with_config(
        server_app,
        client_app,
        num_supernodes,
        run_config,
        APP_DIR,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": num_gpus},
            "init_args": {"include_dashboard": False, "log_to_driver": True},
        },
    )


def sync_seconds_per_byte(options: Options, checkpoint_dir: str) -> float:
    """Calibration: how long a synchronous ``torch.save`` of the model takes here, per byte (on the
    checkpoint directory's file system; in the system's temp directory for a URL)."""
    model = task.Net(options.width, options.depth)
    local = None if "://" in checkpoint_dir else checkpoint_dir
    if local is not None:
        os.makedirs(local, exist_ok=True)
    timings = []
    with tempfile.TemporaryDirectory(dir=local) as scratch:
        for attempt in range(3):
            start = time.perf_counter()
            torch.save(model, os.path.join(scratch, f"calibration-{attempt}.pt"))
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) / task.model_bytes(model)


def client_total(outcome: Outcome, key: str) -> float:
    """A client metric, summed over the train and evaluate replies of the rounds this run ran."""
    result = outcome.result
    assert result is not None
    histories = (result.train_metrics_clientapp, result.evaluate_metrics_clientapp)
    this_run = [r for r in result.train_metrics_clientapp if r > outcome.resumed_from_round]
    return sum(float(history[r][key]) for history in histories for r in this_run if r in history)


def summarize(
    options: Options, checkpoint_dir: str, outcome: Outcome, wall_seconds: float, seconds_per_byte: float
) -> dict:
    result = outcome.result
    assert result is not None
    checkpoint_bytes = client_total(outcome, "checkpoint-bytes") + outcome.server_checkpoint_bytes
    final_loss = result.evaluate_metrics_clientapp.get(max(result.evaluate_metrics_clientapp, default=0), {})
    return {
        "rounds_completed": max(result.train_metrics_clientapp, default=outcome.resumed_from_round),
        "resumed_from_round": outcome.resumed_from_round,
        "checkpoints_written": outcome.checkpoints_written,
        "blocked_seconds": round(client_total(outcome, "fedckpt-blocked-s") + outcome.server_blocked_seconds, 4),
        "sync_seconds_estimate": round(checkpoint_bytes * seconds_per_byte, 4),
        "checkpoint_bytes": int(checkpoint_bytes),
        "bytes_written": outcome.bytes_written,
        "bytes_linked": outcome.bytes_linked,
        "wall_seconds": round(wall_seconds, 3),
        "final_loss": final_loss.get("loss"),
        "final_accuracy": final_loss.get("accuracy"),
        "checkpointing": "fedckpt",
        "num_clients": options.num_clients,
        "num_rounds": options.num_rounds,
        "model_bytes": task.model_bytes(task.Net(options.width, options.depth)),
        "simulated_accelerator_ms": options.simulated_accelerator_ms,
        "num_gpus_per_client": options.num_gpus_per_client,
        "checkpoint_dir": checkpoint_dir,
    }


def main(argv: list[str] | None = None) -> int:
    options, checkpoint_dir = parse_options(argv)
    seconds_per_byte = sync_seconds_per_byte(options, checkpoint_dir)
    outcome = Outcome()
    start = time.perf_counter()
    simulate(
        make_server_app(options, outcome), client_app.app, options.num_clients, {"checkpoint-dir": checkpoint_dir},
        options.num_gpus_per_client,
    )  # fmt: skip
    summary = summarize(options, checkpoint_dir, outcome, time.perf_counter() - start, seconds_per_byte)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
