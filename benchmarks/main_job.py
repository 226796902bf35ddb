"""The README's main job with fedckpt against FL4Health-style synchronous saves, as a new user runs it.

    .venv/bin/python benchmarks/main_job.py                  # defaults of the main job, medians of 3
    .venv/bin/python benchmarks/main_job.py --repeats 5 --json main_job.json

Runs ``examples/flower_simulation/run.py`` with its default settings (10 clients, 5 rounds, the
305 KB MLP) and its ``sync`` baseline (``flower_baselines.py``), each in its own process with a
fresh local Ray on 127.0.0.1, interleaved (the order reverses every repeat), and prints the
medians of ``blocked_seconds`` (time clients and server waited on checkpointing, restores included)
and ``wall_seconds``, with fedckpt's figures as ratios of sync's. ``--with-none`` adds runs without
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flower_walltime import add_run_options, median_of, run_interleaved, walltime_table, wide_console  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-none", action="store_true", help="also run without checkpoints")
    add_run_options(parser)
    args = parser.parse_args(argv)
    console = wide_console()
    modes = ("none", "sync", "fedckpt") if args.with_none else ("sync", "fedckpt")
    runs = run_interleaved(modes, [], args.repeats, args.dir, console)
    first = runs["fedckpt"][0]
    title = (
        f"The main job: {first['num_clients']} clients, {first['num_rounds']} rounds, "
        f"{first['model_bytes'] / 1e3:.0f} KB model, median of {args.repeats}"
    )
    console.print(walltime_table(runs, title))
    blocked = median_of(runs["fedckpt"], "blocked_seconds") / median_of(runs["sync"], "blocked_seconds")
    wall = median_of(runs["fedckpt"], "wall_seconds") / median_of(runs["sync"], "wall_seconds")
    console.print(
        f"fedckpt / sync: blocked_seconds {blocked:.2f}x (target at most 0.5x), "
        f"wall_seconds {wall:.3f}x (target at most 1x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
