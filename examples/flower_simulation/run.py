"""Run the example Flower simulation with fedckpt checkpoints; resume it after a crash.

    python examples/flower_simulation/run.py --compare          # fedckpt beside synchronous saves, measured
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
server's, restores included) and blocked_by_activity (where it went), with the wall time and
settings. ``--checkpointing sync`` runs the same simulation with FL4Health-style ``torch.save``
calls instead (``none``: no checkpoints; see ``baselines.py``). ``--compare`` runs fedckpt and sync
in turn, each in its own process with a fresh Ray, ``--compare-repeats`` times each in alternating
order, and prints their medians side by side; its last line is a JSON summary of both.
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
# The Flower App's comparison of fedckpt with sync: the medians and the table.
sys.path.insert(1, os.path.join(os.path.dirname(APP_DIR), "flower_app"))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from compare import comparison, comparison_table  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

import baselines  # noqa: E402
import client_app  # noqa: E402
import server_app  # noqa: E402
import task  # noqa: E402
from flower_run import run_simulation_with_config  # noqa: E402
from server_app import Options, Outcome, make_server_app  # noqa: E402


@dataclass(frozen=True)
class RunSettings:
    """What one invocation does: the simulation's options, where it checkpoints, and how."""

    options: Options
    checkpoint_dir: str
    checkpointing: str  # fedckpt, sync or none (baselines.py)
    compare: bool
    compare_repeats: int


def parse_options(argv: list[str] | None = None) -> RunSettings:
    """The run's settings and its checkpoint directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpointing", choices=baselines.MODES, default="fedckpt",
        help="fedckpt (default), sync (FL4Health-style torch.save calls) or none",
    )  # fmt: skip
    parser.add_argument(
        "--compare", action="store_true",
        help="run fedckpt and sync in turn (fresh processes, alternating order) and print both measured",
    )  # fmt: skip
    parser.add_argument("--compare-repeats", type=int, default=3, help="--compare: runs of each (default 3)")
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--num-rounds", type=int, default=5)
    parser.add_argument("--checkpoint-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", choices=task.MODELS, default="mlp",
        help="mlp (default: --width and --depth size it) or cnn (a 4.3 MB CNN with batch norm on 3x32x32 inputs)",
    )  # fmt: skip
    parser.add_argument(
        "--model-format", choices=("pt", "safetensors"), default="pt",
        help="the clients' model checkpoints: pre_latest.pt (default: torch.save's format, FL4Health's names) or "
        ".safetensors (fedckpt only; the sync baseline writes .pt)",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=256, help="hidden width (2 layers: 4*width^2*2 bytes of weights)")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    parser.add_argument(
        "--model-mb", type=float, default=None, metavar="N",
        help="a model of about N MB (10**6 bytes): sets --width for --depth (100: the regime where saves cost "
        "more than a round's training, see docs/benchmarks.md)",
    )  # fmt: skip
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
    if args.compare and (args.checkpoint_dir is not None or args.checkpointing != "fedckpt"):
        parser.error("--compare runs each mode in a new directory of its own: no --checkpoint-dir or --checkpointing")
    if args.model_mb is not None:
        if args.model != "mlp":
            parser.error("--model-mb sizes the MLP; the CNN has one size")
        if args.model_mb <= 0:
            parser.error("--model-mb must be a positive size in MB")
        args.width = task.width_for(args.model_mb, args.depth)
    if args.compare_repeats < 1:
        parser.error("--compare-repeats must be at least 1")
    if args.checkpointing != "fedckpt" and (args.keep_rounds or args.num_gpus_per_client or args.model_format != "pt"):
        parser.error(
            "--keep-rounds, --num-gpus-per-client and --model-format are fedckpt's: the baselines keep one .pt "
            "file each, on CPU"
        )
    if not 0 <= args.num_gpus_per_client <= 1:
        parser.error("--num-gpus-per-client is a share of one GPU, from 0 to 1")
    if args.num_gpus_per_client and not torch.cuda.is_available():
        parser.error("--num-gpus-per-client needs a CUDA device, and torch sees none here")
    options = Options(
        num_clients=args.num_clients,
        num_rounds=args.num_rounds,
        seed=args.seed,
        model=args.model,
        model_format=args.model_format,
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
    directory = args.checkpoint_dir or ("" if args.compare else tempfile.mkdtemp(prefix="fedckpt-flower-"))
    # A URL (s3://bucket/run, with the AWS environment variables) stays as it is.
    directory = directory if "://" in directory else os.path.abspath(directory)
    return RunSettings(options, directory, args.checkpointing, args.compare, args.compare_repeats)


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


def client_total(outcome: Outcome, key: str) -> float:
    """A client metric, summed over the train and evaluate replies of the rounds this run ran."""
    result = outcome.result
    assert result is not None
    histories = (result.train_metrics_clientapp, result.evaluate_metrics_clientapp)
    this_run = [r for r in result.train_metrics_clientapp if r > outcome.resumed_from_round]
    return sum(float(history[r].get(key, 0.0)) for history in histories for r in this_run if r in history)


def blocked_by_activity(outcome: Outcome) -> dict[str, float]:
    """Where the blocked time went: the clients' activities summed over clients and rounds, and the server's."""
    result = outcome.result
    assert result is not None
    prefix, suffix = server_app.BLOCKED_PREFIX, "-s"
    activities = {
        key.removeprefix(prefix).removesuffix(suffix)
        for history in (result.train_metrics_clientapp, result.evaluate_metrics_clientapp)
        for metrics in history.values()
        for key in metrics
        if key.startswith(prefix) and key != f"{prefix}s"
    }
    breakdown = {f"client {a}": client_total(outcome, f"{prefix}{a}{suffix}") for a in sorted(activities)}
    breakdown.update({f"server {a}": seconds for a, seconds in sorted(outcome.server_blocked_by_activity.items())})
    return {name: round(seconds, 4) for name, seconds in breakdown.items()}


def summarize(settings: RunSettings, outcome: Outcome, wall_seconds: float) -> dict:
    """The run's JSON summary (the last line it prints)."""
    options, result = settings.options, outcome.result
    if result is None or len(result.train_metrics_clientapp) < options.num_rounds - outcome.resumed_from_round:
        raise RuntimeError(
            "the simulation did not complete its rounds (a client failed: see Flower's log above); "
            f"rounds with train replies: {sorted(result.train_metrics_clientapp) if result else []}"
        )
    checkpointed = settings.checkpointing != "none"
    checkpoint_bytes = client_total(outcome, "checkpoint-bytes") + outcome.server_checkpoint_bytes
    checkpoints_written = outcome.checkpoints_written
    if settings.checkpointing == "sync":  # fedckpt's writers count every save; the baseline's clients report theirs
        checkpoints_written += int(client_total(outcome, "checkpoint-saves"))
    final_loss = result.evaluate_metrics_clientapp.get(max(result.evaluate_metrics_clientapp, default=0), {})
    return {
        "rounds_completed": max(result.train_metrics_clientapp, default=outcome.resumed_from_round),
        "resumed_from_round": outcome.resumed_from_round,
        "checkpoints_written": checkpoints_written,
        "blocked_seconds": round(client_total(outcome, "fedckpt-blocked-s") + outcome.server_blocked_seconds, 4),
        "blocked_by_activity": blocked_by_activity(outcome),
        "checkpoint_bytes": int(checkpoint_bytes) if checkpointed else 0,
        "bytes_written": outcome.bytes_written,
        "bytes_linked": outcome.bytes_linked,
        "wall_seconds": round(wall_seconds, 3),
        "final_loss": final_loss.get("loss"),
        "final_accuracy": final_loss.get("accuracy"),
        "checkpointing": settings.checkpointing,
        "num_clients": options.num_clients,
        "num_rounds": options.num_rounds,
        "model": options.model,
        "model_format": options.model_format,
        "model_bytes": task.model_bytes(task.build(options.model, options.width, options.depth)),
        "simulated_accelerator_ms": options.simulated_accelerator_ms,
        "num_gpus_per_client": options.num_gpus_per_client,
        "checkpoint_dir": settings.checkpoint_dir,
    }


def run(settings: RunSettings) -> dict:
    """One simulation with the checkpoints ``settings`` ask for; its summary."""
    options, outcome = settings.options, Outcome()
    if settings.checkpointing == "fedckpt":
        apps = (make_server_app(options, outcome), client_app.app)
    else:
        apps = (
            baselines.make_server_app(settings.checkpointing, options, outcome),
            baselines.make_client_app(settings.checkpointing),
        )
    start = time.perf_counter()
    simulate(*apps, options.num_clients, {"checkpoint-dir": settings.checkpoint_dir}, options.num_gpus_per_client)
    return summarize(settings, outcome, time.perf_counter() - start)


COMPARED = ("sync", "fedckpt")


def compare(argv: list[str], repeats: int) -> dict:
    """fedckpt and sync ``repeats`` times each, every run in a process of its own (a fresh Ray) and in
    a new directory, the order alternating (drifts of the machine fall on both); prints the medians."""
    forwarded = [arg for arg in argv if arg != "--compare"]
    runs: dict[str, list[dict]] = {mode: [] for mode in COMPARED}
    with tempfile.TemporaryDirectory(prefix="fedckpt-compare-") as work:
        for repeat in range(repeats):
            for mode in COMPARED if repeat % 2 == 0 else tuple(reversed(COMPARED)):
                print(f"run {repeat + 1}/{repeats}: {mode} ...", flush=True)
                directory = os.path.join(work, f"{mode}-{repeat}")
                options = forwarded if mode == "fedckpt" else without_option(forwarded, "--model-format")
                argv_of_run = [*options, "--checkpointing", mode, "--checkpoint-dir", directory]
                runs[mode].append(run_in_subprocess(argv_of_run))
                shutil.rmtree(directory, ignore_errors=True)
    summary = comparison(runs)
    print(comparison_table(summary), flush=True)
    return summary


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` less ``option`` and its value (``--option value`` or ``--option=value``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            kept.append(arg)
    return kept


def run_in_subprocess(argv: list[str]) -> dict:
    """This script with ``argv`` in a new process; its summary (its last line)."""
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(argv)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse_options(argv)
    summary = compare(argv, settings.compare_repeats) if settings.compare else run(settings)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
