"""A plain PyTorch program's first checkpoint: how long it blocks, in a fresh process with no Ray.

    .venv/bin/python benchmarks/first_save.py [--repeats 3]

Each sample is a new interpreter that builds the same 0.3 MB MLP and saves it once, then a
second time, in one of three ways (the order rotates every repeat; medians over repeats):

- ``torch.save``: what the program did before fedckpt;
- ``fedckpt``: ``LatestTorchModuleCheckpointer(...).maybe_checkpoint``: Ray and the writer pool start
  in the background (``fedckpt.runtime.background_start``);
- ``fedckpt after init()``: ``fedckpt.init()`` first (timed as part of the first save): the
  eager start, which is what every program's first save waited for before the background start.

Each program then flushes (timed as "durable after"), checks the file, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

from rich.console import Console
from rich.table import Table

MODES = ("torch.save", "fedckpt", "fedckpt after init()")

PROGRAM = """
import json, sys, time
import torch
mode, directory = sys.argv[1], sys.argv[2]
if mode != "torch.save":
    import fedckpt  # a program imports it at the top: not part of the save
    from fedckpt import LatestTorchModuleCheckpointer
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 42))
path = directory + "/model.pt"
started = time.perf_counter()
if mode == "torch.save":
    torch.save(model, path)
    first = time.perf_counter() - started
    started = time.perf_counter()
    torch.save(model, path)
    second = time.perf_counter() - started
    durable = 0.0
else:
    if mode == "fedckpt after init()":
        fedckpt.init()
    checkpointer = LatestTorchModuleCheckpointer(directory, "model.pt")
    checkpointer.maybe_checkpoint(model, 1.0, {})
    first = time.perf_counter() - started
    started = time.perf_counter()
    checkpointer.maybe_checkpoint(model, 0.5, {})
    second = time.perf_counter() - started
    started = time.perf_counter()
    fedckpt.flush()
    durable = time.perf_counter() - started
loaded = torch.load(path, weights_only=False)
assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
print(json.dumps({"first": first, "second": second, "durable": durable}))
"""


def run_one(mode: str) -> dict[str, float]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray, as a plain program gets
    with tempfile.TemporaryDirectory() as directory:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(PROGRAM), mode, directory],
            capture_output=True, text=True, timeout=300, env=env, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
        for mode in order:
            sample = run_one(mode)
            samples[mode].append(sample)
            console.print(f"[{repeat + 1}/{args.repeats}] {mode}: first save {sample['first'] * 1000:.1f} ms")
    baseline = statistics.median(sample["first"] for sample in samples["torch.save"])
    table = Table(title=f"A fresh program's first save (0.3 MB MLP, .pt), medians of {args.repeats}")
    for column in ("method", "first save ms", "x torch.save", "second save ms", "durable after ms"):
        table.add_column(column, justify="left" if column == "method" else "right")
    summary = {}
    for mode in MODES:
        first, second, durable = (statistics.median(sample[field] for sample in samples[mode])
                                  for field in ("first", "second", "durable"))  # fmt: skip
        summary[mode] = {"first_ms": first * 1000, "second_ms": second * 1000, "ratio": first / baseline}
        table.add_row(mode, f"{first * 1000:.1f}", f"{first / baseline:.2f}x", f"{second * 1000:.2f}",
                      f"{durable * 1000:.0f}" if durable else "-")  # fmt: skip
    Console().print(table)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
