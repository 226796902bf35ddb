"""The CPU a model save costs its writer, by file name: ``.pt`` (torch.save's format) against ``.safetensors``.

    .venv/bin/python benchmarks/writer_cpu.py                    # a 100 MB model, 20 saves of each
    .venv/bin/python benchmarks/writer_cpu.py --mb 400 --saves 10

One process, one local Ray on 127.0.0.1. The same model is saved under both names in turns (the
model changed in place before each save), each save waited for until durable. For each save: the
CPU time the writers on this node used meanwhile (``/proc/PID/task/*/schedstat``: nanoseconds on
the CPU, every live thread), and the caller's own (``time.process_time``: every thread of this
process). The writers' time is what a save takes from training on a busy node beyond the copy the
caller waits for. Medians and ranges.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ADDRESS", "local")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt import LatestTorchModuleCheckpointer  # noqa: E402
from fedckpt.bench.methods import node_writer_pids  # noqa: E402

NAMES = (".pt", ".safetensors")


def model_of(megabytes: float) -> torch.nn.Module:
    """Two square Linear layers of about ``megabytes`` MB in all."""
    width = int((megabytes * 1e6 / 8) ** 0.5)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of every live thread of ``pids`` (schedstat's nanoseconds: finer than /proc/PID/stat's ticks)."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
    return total / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--saves", type=int, default=20, help="saves under each name")
    args = parser.parse_args(argv)
    model = model_of(args.mb)
    samples: dict[str, dict[str, list[float]]] = {name: {"writer": [], "caller": []} for name in NAMES}
    with tempfile.TemporaryDirectory() as directory:
        checkpointers = {name: LatestTorchModuleCheckpointer(directory, f"model{name}") for name in NAMES}
        for checkpointer in checkpointers.values():  # the first save starts the pool and pickles the structure
            checkpointer.maybe_checkpoint(model, 0.0, {})
            checkpointer.flush()
        writers = node_writer_pids()
        for turn in track(range(2 * args.saves), description="saving", console=Console(stderr=True)):
            name = NAMES[turn % 2] if (turn // 2) % 2 == 0 else NAMES[1 - turn % 2]  # order reversed every pair
            with torch.no_grad():
                next(model.parameters()).add_(1e-3)
            writer, caller = cpu_seconds(writers), time.process_time()
            checkpointers[name].maybe_checkpoint(model, 0.0, {})
            checkpointers[name].flush()
            samples[name]["caller"].append(time.process_time() - caller)
            samples[name]["writer"].append(cpu_seconds(writers) - writer)
        fedckpt.shutdown()
    table = Table(title=f"CPU per save of a {args.mb:g} MB model until durable, {args.saves} saves each (ms)")
    for column in ("name", "writers: median", "range", "caller: median", "range"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for name in NAMES:
        row = [name]
        for part in ("writer", "caller"):
            values = [1e3 * value for value in samples[name][part]]
            row += [f"{statistics.median(values):.1f}", f"{min(values):.1f}-{max(values):.1f}"]
        table.add_row(*row)
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
