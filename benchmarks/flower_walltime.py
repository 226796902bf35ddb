"""Wall time of the example Flower simulation with no checkpoints, FL4Health-style synchronous saves, and fedckpt.

    .venv/bin/python benchmarks/flower_walltime.py                   # ~100 MB model, 10 clients, 3 rounds
    .venv/bin/python benchmarks/flower_walltime.py --repeats 3 --json walltime.json
    .venv/bin/python benchmarks/flower_walltime.py --simulated-accelerator-ms 40   # accelerator-bound clients

Runs ``examples/flower_simulation/run.py --checkpointing`` ``none``, ``sync`` (the same run with
other checkpoints: ``baselines.py`` there) and ``fedckpt`` twice, with the clients' model files named
``.pt`` (torch.save's format, FL4Health's habit) and ``.safetensors`` (``--model-format``), once per
mode and repeat, in separate processes (each with a fresh local Ray on 127.0.0.1), interleaving the
modes so that drifts of the machine fall on all of them alike, and prints the median simulation wall
time per mode with its overhead over no checkpointing. Each client saves a pre-aggregation
checkpoint, its state (optimizer momentum) and a post-aggregation checkpoint per round; the server
saves the global model and its state.

``--simulated-accelerator-ms`` stands in for GPU clients, which there is no GPU here to run: each
local step computes on one thread, then holds the host idle for that long, as a step waiting on the
device would. Its results are labelled SIMULATED wherever they are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_ADDRESS"] = "local"  # each run a fresh local Ray on 127.0.0.1
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "flower_simulation"))
from run import run_in_subprocess  # noqa: E402

# What each mode passes to run.py ("fedckpt": its defaults, .pt names).
MODE_OPTIONS = {
    "none": ["--checkpointing", "none"],
    "sync": ["--checkpointing", "sync"],
    "fedckpt": ["--checkpointing", "fedckpt"],
    "fedckpt .safetensors": ["--checkpointing", "fedckpt", "--model-format", "safetensors"],
}
MODES = ("none", "sync", "fedckpt", "fedckpt .safetensors")


def run_once(mode: str, options: list[str], root: str) -> dict:
    """One run of the example (or a baseline of it) in its own process (a fresh local Ray); its JSON summary."""
    directory = tempfile.mkdtemp(prefix="run-", dir=root)
    try:
        return run_in_subprocess([*MODE_OPTIONS[mode], "--checkpoint-dir", directory, *options])
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_interleaved(modes: tuple[str, ...], options: list[str], repeats: int, root: str | None, console: Console,
                    ) -> dict[str, list[dict]]:  # fmt: skip
    """Every mode ``repeats`` times, the order reversed every repeat (drifts of the machine fall on all)."""
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="fedckpt-walltime-", dir=root) as work, Progress(console=console) as bar:
        task = bar.add_task("simulations", total=repeats * len(modes))
        for repeat in range(repeats):
            for mode in modes if repeat % 2 == 0 else tuple(reversed(modes)):
                bar.update(task, description=f"repeat {repeat + 1}/{repeats}: {mode}")
                runs[mode].append(run_once(mode, options, work))
                bar.advance(task)
    return runs


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(float(run[key]) for run in runs)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every interleaved-runs benchmark takes."""
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the runs' checkpoint directories go (default: system temp)")
    parser.add_argument("--json", default=None, help="also write every run's summary here")


def wide_console() -> Console:
    """A console that keeps tables whole when stdout is redirected (it would fold them into 80 columns)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=10)
    parser.add_argument("--num-rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=3584, help="3584 with --depth 3: a 103 MB model")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument(
        "--simulated-accelerator-ms",
        type=float,
        default=0.0,
        help="each local step holds the host idle this long, as a GPU step would (SIMULATED)",
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    console = wide_console()
    options = ["--num-clients", str(args.num_clients), "--num-rounds", str(args.num_rounds), "--width",
               str(args.width), "--depth", str(args.depth), "--local-steps", str(args.local_steps)]  # fmt: skip
    if args.simulated_accelerator_ms:
        options += ["--simulated-accelerator-ms", str(args.simulated_accelerator_ms)]
    runs = run_interleaved(MODES, options, args.repeats, args.dir, console)
    accelerator = (
        f", SIMULATED accelerator ({args.simulated_accelerator_ms} ms a step)" if args.simulated_accelerator_ms else ""
    )
    title = (f"Flower simulation wall time: {args.num_clients} clients, {args.num_rounds} rounds, "
             f"{runs['none'][0]['model_bytes'] / 1e6:.0f} MB model{accelerator}, median of {args.repeats}")  # fmt: skip
    console.print(walltime_table(runs, title))
    overhead = {mode: median_of(runs[mode], "wall_seconds") / median_of(runs["none"], "wall_seconds") - 1
                for mode in MODES if mode != "none"}  # fmt: skip
    for mode, names in (("fedckpt", ".pt"), ("fedckpt .safetensors", ".safetensors")):
        ratio = overhead[mode] / overhead["sync"] if overhead["sync"] > 0 else float("nan")
        console.print(f"fedckpt's overhead over no checkpointing with {names} names is {ratio:.2f}x synchronous "
                      f"saves' ({overhead[mode] * 100:+.1f}% against {overhead['sync'] * 100:+.1f}%).")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


def walltime_table(runs: dict[str, list[dict]], title: str) -> Table:
    """Medians per mode: wall time and overhead over ``none`` (if run), time blocked, bytes."""
    table = Table(title=title)
    columns = ("checkpointing", "wall s", "overhead", "runs (s)", "blocked s", "checkpoints", "GB saved",
               "GB written", "GB linked")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "checkpointing" else "right")
    baseline = median_of(runs["none"], "wall_seconds") if runs.get("none") else None
    for mode, mode_runs in runs.items():
        wall = median_of(mode_runs, "wall_seconds")
        last = mode_runs[-1]
        written, linked = last.get("bytes_written"), last.get("bytes_linked")
        table.add_row(
            "fedckpt .pt" if mode == "fedckpt" else mode,
            f"{wall:.1f}",
            "—" if mode == "none" or baseline is None else f"{(wall / baseline - 1) * 100:+.1f}%",
            " ".join(f"{run['wall_seconds']:.1f}" for run in mode_runs),
            f"{median_of(mode_runs, 'blocked_seconds'):.3f}",
            str(last["checkpoints_written"]),
            f"{last['checkpoint_bytes'] / 1e9:.2f}",
            "—" if written is None else f"{written / 1e9:.2f}",
            "—" if linked is None else f"{linked / 1e9:.2f}",
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
