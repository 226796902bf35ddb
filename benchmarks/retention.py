"""Retention at scale: 100 rounds x 10 clients under ``LatestN(3)``, beside the same saves without a policy.

    .venv/bin/python benchmarks/retention.py                       # 100 rounds, 10 clients
    .venv/bin/python benchmarks/retention.py --rounds 30 --clients 4 --json out.json

Each client-round saves what a Flower client saves: its model after local training (a
``.safetensors`` checkpoint of an MLP) and its state (its SGD momentum and a step counter). The two
runs are interleaved round by round (which goes first alternates), each in its own directory, and
each round ends with a flush, as a Flower round's commit does. Reported:

* the caller's blocked time per save (median and p90 over every save of the run): a policy adds
  only its request to the save, the deletions run in the writer;
* the disk use of each directory after rounds 10, 50 and 100 (bytes of the files below it, hard
  links counted once): without a policy it stays one round's worth; with ``LatestN(3)`` three
  rounds' worth (three versions, each plain name a hard link to its newest), and it stays there;
* the flush time per round (the writer's work, deletions included).
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
os.environ.setdefault("RAY_ADDRESS", "local")

import ray  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt import LatestTorchModuleCheckpointer, PerRoundStateCheckpointer  # noqa: E402
from fedckpt.cli_tables import Column, print_table  # noqa: E402
from fedckpt.retention import LatestN, RetentionPolicy  # noqa: E402


def disk_bytes(directory: str) -> int:
    """Bytes of the regular files below ``directory``, each inode once (hard links share one)."""
    seen, total = set(), 0
    for folder, _, names in os.walk(directory):
        for name in names:
            info = os.lstat(os.path.join(folder, name))
            if info.st_ino not in seen:
                seen.add(info.st_ino)
                total += info.st_size
    return total


class Run:
    """One configuration's clients: their checkpointers in their directory, and the times measured."""

    def __init__(self, directory: str, clients: int, keep: RetentionPolicy | None) -> None:
        self.directory = directory
        self.models = [
            LatestTorchModuleCheckpointer(directory, f"client_{index}/pre.safetensors", keep=keep)
            for index in range(clients)
        ]
        self.states = PerRoundStateCheckpointer(directory, keep=keep)
        self.blocked: list[float] = []
        self.flushes: list[float] = []
        self.disk: dict[int, int] = {}

    def round(self, server_round: int, model: nn.Module, momentum: dict[str, torch.Tensor]) -> None:
        for index, checkpointer in enumerate(self.models):
            started = time.perf_counter()
            checkpointer.maybe_checkpoint(model, 1.0, {}, server_round=server_round)
            self.blocked.append(time.perf_counter() - started)
            started = time.perf_counter()
            self.states.save_checkpoint(
                f"client_{index}/state.pt", {"momentum": momentum, "steps": server_round}, server_round=server_round
            )
            self.blocked.append(time.perf_counter() - started)
        started = time.perf_counter()
        fedckpt.flush()
        self.flushes.append(time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--width", type=int, default=256, help="the MLP's hidden width (about 4 * width^2 bytes)")
    parser.add_argument("--keep", type=int, default=3, help="LatestN's n")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    fedckpt.init()
    checkpoints = sorted({r for r in (1, 10, 50, args.rounds) if r <= args.rounds})
    with tempfile.TemporaryDirectory(prefix="fedckpt-retention-") as root:
        runs = {
            "no policy": Run(os.path.join(root, "plain"), args.clients, None),
            f"LatestN({args.keep})": Run(os.path.join(root, "kept"), args.clients, LatestN(args.keep)),
        }
        for server_round in range(1, args.rounds + 1):
            torch.manual_seed(server_round)  # a new model each round (no dedup between rounds)
            model = nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(), nn.Linear(args.width, args.width))
            momentum = {name: torch.randn_like(value) for name, value in model.state_dict().items()}
            order = list(runs.values()) if server_round % 2 else list(reversed(runs.values()))
            for run in order:
                run.round(server_round, model, momentum)
                if server_round in checkpoints:
                    run.disk[server_round] = disk_bytes(run.directory)
            if server_round % 10 == 0 or server_round == args.rounds:
                print(f"round {server_round}/{args.rounds}", file=sys.stderr, flush=True)
        figures = {
            name: {
                "blocked_ms_median": 1e3 * statistics.median(run.blocked),
                "blocked_ms_p90": 1e3 * statistics.quantiles(run.blocked, n=10)[-1],
                "flush_ms_median": 1e3 * statistics.median(run.flushes),
                "disk_mib": {r: run.disk[r] / 2**20 for r in checkpoints if r in run.disk},
            }
            for name, run in runs.items()
        }
    fedckpt.shutdown()
    ray.shutdown()
    base = figures["no policy"]["blocked_ms_median"]
    # blocked: per save, the caller's time; flush: per round; MiB@r: disk use after round r.
    columns = [Column("run", keep_whole=True), Column("p50 ms", right=True), Column("x none", right=True),
               Column("p90 ms", right=True), Column("flush ms", right=True)]  # fmt: skip
    columns += [Column(f"MiB@{r}", right=True) for r in checkpoints]
    rows = [
        [name, f"{f['blocked_ms_median']:.3f}", f"{f['blocked_ms_median'] / base:.2f}x", f"{f['blocked_ms_p90']:.3f}",
         f"{f['flush_ms_median']:.1f}", *(f"{f['disk_mib'].get(r, 0):.1f}" for r in checkpoints)]
        for name, f in figures.items()
    ]  # fmt: skip
    print_table(
        f"{args.rounds} rounds x {args.clients} clients: a model and a state save per client-round", columns, rows
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"args": vars(args), "figures": figures}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
