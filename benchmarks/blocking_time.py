"""Blocking time of one save: fedckpt ``maybe_checkpoint`` beside synchronous ``torch.save``.

Same model, same process, same run. The model is mutated between saves (as training would), and
each method's saves are repeated; the table gives p50 / p99 / mean of the time the caller waited.

Run:  python benchmarks/blocking_time.py --size-mb 400 --repeats 8 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

import fedckpt  # noqa: E402

MB = 1 << 20


def model_of(megabytes: int, tensors: int = 8) -> nn.Module:
    """An fp32 model of ``tensors`` equal square weights adding up to about ``megabytes``."""
    side = int((megabytes * MB / 4 / tensors) ** 0.5)
    return nn.Sequential(*(nn.Linear(side, side, bias=False) for _ in range(tensors)))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    console = Console()
    model = model_of(args.size_mb)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    directory = tempfile.mkdtemp(prefix="fedckpt-bench-")
    checkpointer = fedckpt.LatestTorchModuleCheckpointer(directory, "fedckpt.safetensors")
    results: dict[str, list[float]] = {"torch.save (FL4Health)": [], "fedckpt maybe_checkpoint": []}

    def mutate() -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)

    with Progress(console=console, transient=True) as progress:
        warm = progress.add_task("warm-up (starts Ray and the writers)", total=2)
        checkpointer.maybe_checkpoint(model, 0.0, {})
        torch.save(model, os.path.join(directory, "torch.pt"))
        fedckpt.flush()
        progress.advance(warm, 2)
        task = progress.add_task(f"{args.repeats} saves each of a {nbytes / MB:.0f} MB model", total=args.repeats)
        for _ in range(args.repeats):
            mutate()
            start = time.perf_counter()
            torch.save(model, os.path.join(directory, "torch.pt"))
            results["torch.save (FL4Health)"].append(time.perf_counter() - start)
            mutate()
            start = time.perf_counter()
            checkpointer.maybe_checkpoint(model, 0.0, {})
            results["fedckpt maybe_checkpoint"].append(time.perf_counter() - start)
            fedckpt.flush()  # each save starts from an idle writer, as between rounds
            progress.advance(task)

    baseline = statistics.median(results["torch.save (FL4Health)"])
    table = Table(title=f"Blocking time per save, {nbytes / MB:.0f} MB fp32 model, {args.repeats} saves each")
    for column in ("method", "p50 ms", "p99 ms", "mean ms", "p50 vs torch.save"):
        table.add_column(column, justify="left" if column == "method" else "right")
    summary = {}
    for method, samples in results.items():
        p50, p99 = statistics.median(samples), percentile(samples, 0.99)
        summary[method] = {"p50_s": p50, "p99_s": p99, "mean_s": statistics.fmean(samples), "samples_s": samples}
        table.add_row(method, f"{p50 * 1e3:.1f}", f"{p99 * 1e3:.1f}", f"{statistics.fmean(samples) * 1e3:.1f}",
                      f"{baseline / p50:.1f}x faster" if p50 < baseline else "1.0x")  # fmt: skip
    console.print(table)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model_bytes": nbytes, "repeats": args.repeats, "results": summary}, file, indent=2)
    fedckpt.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
