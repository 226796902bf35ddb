"""Saves/s and MB/s against the number of nodes of a loopback Ray cluster, for the same total work.

    .venv/bin/python benchmarks/cluster_scale.py                                  # 1-4 nodes, 8 clients, 8 MB
    .venv/bin/python benchmarks/cluster_scale.py --nodes 1 2 --clients 4 --rounds 2 --state-mb 1 --repeats 1
    .venv/bin/python benchmarks/cluster_scale.py --out runs.json

Every node of the cluster is a ``ray.cluster_utils.Cluster`` node on 127.0.0.1 of THIS machine: all
of them share its CPU cores (2 on the machine this was written on) and its one disk. So the figures
measure what fedckpt's protocol costs as nodes are added (homes ordering saves staged on other
nodes, node writers started per node, the control messages between them), not how a real cluster
scales; for that see the analytic model ``benchmarks/cluster_model.py``.

One measurement (one "run") for N nodes:

1. start a fresh cluster of N nodes (``num_cpus=1``, 256 MiB object store each, node i has the
   custom resource ``node_<i>``), connect, ``fedckpt.init(num_writers=1, namespace=<unique>)``;
2. create ``--clients`` client actors (``num_cpus=0``), client c pinned to node ``c % N``, and warm
   each up (one small save and a flush: its worker, torch, staging and its node's writer start);
3. time from issuing every client's rounds (one remote call each: ``--rounds`` saves back to back,
   then ``fedckpt.flush()``) until all have returned and the driver's own ``fedckpt.flush()`` returned;
4. collect each client's ``fedckpt.stats()`` for the timed saves; shut down fedckpt, Ray and the
   cluster; remove the checkpoint directory and what the cluster's processes left in /dev/shm.

Each save is a ``PerRoundStateCheckpointer`` state ``{"round": r, "x": float32 tensor of --state-mb}``
under its own name (``round_<r>.pt``), with distinct content, so that every save's bytes are written
(neither "latest wins" coalescing nor content deduplication skips any). Runs are interleaved
(for each repeat, every node count in turn) and reported as medians per node count, with the ratio
of saves/s to the 1-node median of the same invocation. The object-store column sums the clients'
``bytes_object_store``: 0 means every byte was staged in its own node's shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Any

# Before Ray is imported (fedckpt imports it): keep Ray's nodes on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from ray import cloudpickle  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import fedckpt  # noqa: E402
from fedckpt import PerRoundStateCheckpointer  # noqa: E402
from fedckpt.runtime.staging import PREFIX, SHM_DIR  # noqa: E402

# Ray's tip about accelerator environment variables, once per ray.init: noise between the progress lines.
warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
# Ray workers cannot import this script: ship its classes by value (also when it is imported as a module).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MIB = 1 << 20
NOTE = (
    "All nodes run on this machine and share its {cores} CPU cores and one disk: the figures measure "
    "fedckpt's overhead as nodes are added, not a real cluster's scaling (see benchmarks/cluster_model.py)."
)


@dataclass(frozen=True)
class RunResult:
    """One measurement: N nodes, every client's rounds, timed until all saves are durable."""

    repeat: int
    nodes: int
    clients_per_node: list[int]
    saves: int
    state_bytes: int  # the tensors' bytes of the timed saves
    seconds: float
    bytes_shared_memory: int  # staged in the callers' own nodes' /dev/shm (all clients, timed saves)
    bytes_object_store: int  # staged in Ray's object store (expected: 0)

    @property
    def saves_per_second(self) -> float:
        return self.saves / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.state_bytes / MIB / self.seconds


def numel_of(state_mb: float) -> int:
    """The float32 elements of a state of ``state_mb`` MiB."""
    return max(1, int(state_mb * MIB) // 4)


@ray.remote(num_cpus=0)
class Client:
    """A federated client pinned to one node: saves a state of a fixed size per round into its own directory."""

    def __init__(self, directory: str, namespace: str, state_mb: float, seed: int) -> None:
        fedckpt.init(namespace=namespace)  # joins the pool the driver created
        self.states = PerRoundStateCheckpointer(directory)
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.rand(numel_of(state_mb), generator=generator)  # float32
        self.baseline = fedckpt.stats()

    def warm_up(self) -> None:
        """One small save and a flush (not timed): this worker, its staging and its node's writer start."""
        self.states.save_checkpoint("warm_up.pt", {"x": torch.zeros(1024)})
        fedckpt.flush()
        self.baseline = fedckpt.stats()

    def run(self, rounds: int) -> dict[str, int]:
        """Save one state per round, back to back, then flush; returns the counters of these saves."""
        for server_round in range(rounds):
            self.x[0] = float(server_round)  # new content each round: nothing is deduplicated
            self.states.save_checkpoint(f"round_{server_round}.pt", {"round": server_round, "x": self.x})
        fedckpt.flush()
        now, before = fedckpt.stats(), self.baseline
        return {
            "saves": now.saves - before.saves,
            "bytes_shared_memory": now.bytes_shared_memory - before.bytes_shared_memory,
            "bytes_object_store": now.bytes_object_store - before.bytes_object_store,
        }


def start_cluster(nodes: int) -> Cluster:
    """A cluster of ``nodes`` nodes on 127.0.0.1; node i has the custom resource ``node_<i>``."""
    node_args: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 256 * MIB}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "resources": {"node_0": 100}, "include_dashboard": False},
    )
    for index in range(1, nodes):
        cluster.add_node(**node_args, resources={f"node_{index}": 100})
    cluster.wait_for_nodes()
    return cluster


def spread(clients: int, nodes: int) -> list[int]:
    """The node of each client: round robin, so the counts per node differ by at most one."""
    return [client % nodes for client in range(clients)]


def cluster_pids(cluster: Cluster) -> set[int]:
    """Pids of the cluster's processes (GCS, raylets, ...) and of all their descendants (Ray workers:
    the clients, fedckpt's homes and node writers)."""
    nodes = [cluster.head_node, *cluster.worker_nodes]
    found = {info.process.pid for node in nodes for infos in node.all_processes.values() for info in infos}
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{entry}/stat") as stat:
            parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    todo = list(found)
    while todo:
        new = [child for child in children.get(todo.pop(), []) if child not in found]
        found.update(new)
        todo.extend(new)
    return found


def remove_segments(pids: set[int]) -> None:
    """Remove what these processes (gone with the cluster) left in /dev/shm: the clients' staging
    segments, the writers' sequence-counter files (``fedckpt-<pid>-...``)."""
    prefixes = tuple(f"{PREFIX}{pid}-" for pid in pids)
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefixes):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))


def timed_rounds(clients: list, rounds: int) -> tuple[float, list[dict[str, int]]]:
    """Seconds from issuing every client's rounds until all are durable, and each client's counters."""
    start = time.perf_counter()
    counters = ray.get([client.run.remote(rounds) for client in clients])
    fedckpt.flush()
    return time.perf_counter() - start, counters


def measure(nodes: int, repeat: int, args: argparse.Namespace) -> RunResult:
    """One run on a fresh cluster of ``nodes`` nodes (see the module docstring)."""
    cluster = start_cluster(nodes)
    directory = tempfile.mkdtemp(prefix="fedckpt-cluster-scale-")
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
        namespace = f"fedckpt-cluster-scale-{uuid.uuid4().hex[:12]}"
        fedckpt.init(num_writers=1, namespace=namespace)
        placement = spread(args.clients, nodes)
        clients = [
            Client.options(resources={f"node_{node}": 1}).remote(
                os.path.join(directory, f"client_{index}"), namespace, args.state_mb, seed=index
            )
            for index, node in enumerate(placement)
        ]
        ray.get([client.warm_up.remote() for client in clients])
        seconds, counters = timed_rounds(clients, args.rounds)
    finally:
        pids = cluster_pids(cluster)  # while they run: the clients, the homes and the node writers
        try:
            fedckpt.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            remove_segments(pids)
            shutil.rmtree(directory, ignore_errors=True)
    state_bytes = args.clients * args.rounds * numel_of(args.state_mb) * 4
    return RunResult(
        repeat=repeat,
        nodes=nodes,
        clients_per_node=[placement.count(node) for node in range(nodes)],
        saves=sum(counter["saves"] for counter in counters),
        state_bytes=state_bytes,
        seconds=seconds,
        bytes_shared_memory=sum(counter["bytes_shared_memory"] for counter in counters),
        bytes_object_store=sum(counter["bytes_object_store"] for counter in counters),
    )


def per_node_label(counts: list[int]) -> str:
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def summary_table(results: list[RunResult], node_counts: list[int]) -> Table:
    """Medians per node count, and saves/s against the 1-node median."""
    table = Table(title="fedckpt on a loopback Ray cluster: the same work on 1 to N nodes (medians)")
    headers = ("nodes", "clients per node", "saves", "median s", "saves/s", "MB/s", "× 1 node", "object store bytes")
    for header in headers:
        table.add_column(header, justify="right")
    medians = {
        nodes: statistics.median(run.saves_per_second for run in results if run.nodes == nodes) for nodes in node_counts
    }
    for nodes in node_counts:
        runs = [run for run in results if run.nodes == nodes]
        ratio = f"{medians[nodes] / medians[1]:.2f}" if 1 in medians else "—"
        table.add_row(
            str(nodes),
            per_node_label(runs[0].clients_per_node),
            str(runs[0].saves),
            f"{statistics.median(run.seconds for run in runs):.2f}",
            f"{medians[nodes]:.1f}",
            f"{statistics.median(run.mb_per_second for run in runs):.1f}",
            ratio,
            f"{sum(run.bytes_object_store for run in runs):,}",
        )
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3, 4], help="node counts to measure")
    parser.add_argument("--clients", type=int, default=8, help="clients in all, spread over the nodes")
    parser.add_argument("--rounds", type=int, default=5, help="saves per client, back to back")
    parser.add_argument("--state-mb", type=float, default=8.0, help="MiB of each saved state")
    parser.add_argument("--repeats", type=int, default=3, help="runs per node count (interleaved)")
    parser.add_argument("--out", help="write every run to this JSON file")
    args = parser.parse_args(argv)
    if min(args.nodes) < 1 or args.clients < max(args.nodes):
        parser.error("every node count must be at least 1, and --clients at least the largest node count")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, err = Console(), Console(stderr=True)
    note = NOTE.format(cores=os.cpu_count())
    err.print(note)
    results: list[RunResult] = []
    total = args.repeats * len(args.nodes)
    for repeat in range(args.repeats):
        for nodes in args.nodes:
            err.print(f"[{len(results) + 1}/{total}] repeat {repeat + 1}, {nodes} node(s) ...", end=" ")
            run = measure(nodes, repeat, args)
            results.append(run)
            err.print(
                f"{run.seconds:.2f} s, {run.saves_per_second:.1f} saves/s, {run.mb_per_second:.1f} MB/s, "
                f"object store {run.bytes_object_store:,} B"
            )
    out.print(summary_table(results, args.nodes))
    out.print(f"{args.clients} clients × {args.rounds} rounds × {args.state_mb:g} MiB; MB = MiB. {note}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"args": vars(args), "runs": [asdict(run) for run in results]}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
