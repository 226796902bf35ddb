"""Wall time of the example Flower simulation with no checkpoints, FL4Health-style synchronous saves, and fedckpt.

    .venv/bin/python benchmarks/flower_walltime.py                   # ~100 MB model, 10 clients, 3 rounds
    .venv/bin/python benchmarks/flower_walltime.py --repeats 3 --json walltime.json

Runs ``examples/flower_simulation/run.py`` once per mode and repeat, in separate processes (each
with a fresh local Ray on 127.0.0.1), interleaving the modes so that drifts of the machine fall on
all of them alike, and prints the median simulation wall time per mode with its overhead over no
checkpointing. Each client saves a pre-aggregation checkpoint, its state (optimizer momentum) and a
post-aggregation checkpoint per round; the server saves the global model and its state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

RUN = Path(__file__).resolve().parent.parent / "examples" / "flower_simulation" / "run.py"
MODES = ("none", "sync", "fedckpt")


def run_once(mode: str, args: argparse.Namespace, root: str) -> dict:
    directory = tempfile.mkdtemp(prefix=f"{mode}-", dir=root)
    command = [
        sys.executable,
        str(RUN),
        "--checkpointing", mode,
        "--checkpoint-dir", directory,
        "--num-clients", str(args.num_clients),
        "--num-rounds", str(args.num_rounds),
        "--width", str(args.width),
        "--depth", str(args.depth),
        "--local-steps", str(args.local_steps),
    ]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "local"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    subprocess.run(["rm", "-rf", directory], check=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--num-rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=3584, help="3584 with --depth 3: a 103 MB model")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the runs' checkpoint directories go (default: system temp)")
    parser.add_argument("--json", default=None, help="also write every run's summary here")
    args = parser.parse_args(argv)
    console = Console()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with (
        tempfile.TemporaryDirectory(prefix="fedckpt-walltime-", dir=args.dir) as root,
        Progress(console=console) as bar,
    ):
        task = bar.add_task("simulations", total=args.repeats * len(MODES))
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                bar.update(task, description=f"repeat {repeat + 1}/{args.repeats}: {mode}")
                runs[mode].append(run_once(mode, args, root))
                bar.advance(task)
    baseline = statistics.median(run["wall_seconds"] for run in runs["none"])
    table = Table(title=f"Flower simulation wall time: {args.num_clients} clients, {args.num_rounds} rounds, "
                  f"{runs['none'][0]['model_bytes'] / 1e6:.0f} MB model, median of {args.repeats}")  # fmt: skip
    for column in ("checkpointing", "wall s", "overhead", "runs (s)", "blocked s", "checkpoints", "GB saved"):
        table.add_column(column, justify="left" if column == "checkpointing" else "right")
    for mode in MODES:
        walls = [run["wall_seconds"] for run in runs[mode]]
        wall = statistics.median(walls)
        last = runs[mode][-1]
        table.add_row(
            mode,
            f"{wall:.1f}",
            "—" if mode == "none" else f"{(wall / baseline - 1) * 100:+.1f}%",
            " ".join(f"{w:.1f}" for w in walls),
            f"{statistics.median(run['blocked_seconds'] for run in runs[mode]):.2f}",
            str(last["checkpoints_written"]),
            f"{last['checkpoint_bytes'] / 1e9:.1f}",
        )
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
