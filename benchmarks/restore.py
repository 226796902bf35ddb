"""Where a Flower client's state is cheaper to restore from: Flower's ``context.state`` or its file.

    .venv/bin/python benchmarks/restore.py                      # 0.3, 4, 16 and 100 MB states
    .venv/bin/python benchmarks/restore.py --mb 0.3 16 --repeats 30

For SGD states of several sizes (the momentum of an MLP), times, interleaved, medians:

* FL4Health's synchronous restore, the baseline: ``torch.load`` of a ``torch.save`` file of the same
  state, and ``optimizer.load_state_dict``;
* ``ClientCheckpoints.restore_state`` from the state file, a round after the save (it is durable
  by then): a fresh ``ClientCheckpoints`` without a context, as after a restart: the check for
  pending saves, reading both slots (mapped) to find the newest, and copying it out;
* the same from ``context.state``;
* what keeping the state in the context adds to ``save_state``;
* what Flower's simulation pays to carry the context with each message: a round trip through Ray
  (``ray.put`` and ``ray.get`` of the ``Context``), twice per round (train and evaluate messages).

The sum of the last three against the first is what decides ``CONTEXT_STATE_MAX_BYTES``.
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

import ray  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt.flower import ClientCheckpoints, context_state  # noqa: E402


def optimizer_of(megabytes: float) -> torch.optim.Optimizer:
    width = max(1, int((megabytes * (1 << 20) / 4) ** 0.5))
    model = torch.nn.Linear(width, width, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return optimizer


def one_round(directory: str, context: Context, optimizer: torch.optim.Optimizer, server_round: int,
              first: int) -> dict[str, float]:  # fmt: skip
    """Save the state of ``server_round`` and let it become durable, then restore it in the next round
    with ``torch.load``, from the file and from the context, in turns starting with ``first``; and time
    what keeping it in the context added to the save."""
    everything = 1 << 40
    checkpoints = ClientCheckpoints(directory, context=context, context_state_max_bytes=everything)
    checkpoints.save_state(server_round, optimizer, steps=server_round)
    checkpoints.flush()  # restores come a round later, when the save is long durable
    _, slot = context_state.kept(context)
    state = {"server_round": server_round, "optimizer": optimizer.state_dict(), "steps": server_round}
    start = time.perf_counter()
    context_state.keep(context, state, server_round, slot)  # again, timed: what it adds to save_state
    timings = {"keep": time.perf_counter() - start}
    sync_path = os.path.join(directory, "sync_state.pt")
    torch.save(state, sync_path)
    sources = ("torch.load", "file", "context")
    for source in sources[first:] + sources[:first]:
        checkpoints = ClientCheckpoints(directory, context=context if source == "context" else None)
        start = time.perf_counter()
        if source == "torch.load":  # the checkpoints above left unused: each source pays the same to build them
            optimizer.load_state_dict(torch.load(sync_path, weights_only=False)["optimizer"])
        else:
            checkpoints.restore_state(server_round + 1, optimizer)
        timings[source] = time.perf_counter() - start
    start = time.perf_counter()
    ray.get(ray.put(context))  # how Flower's simulation hands the context to a ClientApp actor and back
    timings["ship"] = 2 * (time.perf_counter() - start)  # with the train and the evaluate message
    return timings


def measure(megabytes: float, repeats: int, directory: str) -> dict[str, float]:
    optimizer = optimizer_of(megabytes)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    rounds = [one_round(directory, context, optimizer, repeat + 1, repeat % 3) for repeat in range(repeats)]
    return {name: statistics.median(timings[name] for timings in rounds) for name in rounds[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, nargs="+", default=[0.3, 4, 16, 100])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=140)
    table = Table(title=f"Restoring a client's SGD state, medians of {args.repeats} (ms)")
    for column in ("state MB", "torch.load", "from the file", "file / torch.load", "from the context",
                   "+ keeping it", "+ Flower carrying it", "context total / file"):  # fmt: skip
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as directory:
        fedckpt.init()
        for megabytes in args.mb:
            result = measure(megabytes, args.repeats, directory)
            total = result["context"] + result["keep"] + result["ship"]
            table.add_row(f"{megabytes:g}", f"{result['torch.load'] * 1e3:.2f}", f"{result['file'] * 1e3:.2f}",
                          f"{result['file'] / result['torch.load']:.2f}x", f"{result['context'] * 1e3:.2f}",
                          f"{result['keep'] * 1e3:.2f}", f"{result['ship'] * 1e3:.2f}",
                          f"{total / result['file']:.2f}x")  # fmt: skip
        fedckpt.shutdown()
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
