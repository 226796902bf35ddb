"""An analytic model of checkpoint traffic on a Ray cluster running a Flower simulation: no Ray, no measurements.

    .venv/bin/python benchmarks/cluster_model.py                      # 64 nodes x 8 clients, 100 MB model
    .venv/bin/python benchmarks/cluster_model.py --storage-gbps 2     # an NFS box instead of an object store
    .venv/bin/python benchmarks/cluster_model.py --nics 10 25 100 200 --dedup-post-aggregation

Two designs get every checkpoint of one round to storage:

- **fixed pool** (fedckpt before node-local writers): ``--pool-writers`` writer actors that Ray
  places on arbitrary nodes (at most one per node here). Each checkpoint key is owned by one writer (``shard_of``, a
  hash of the key, in ``src/fedckpt/runtime/shards.py``); a caller uses shared memory only when that
  writer is on its own node, and otherwise ships the snapshot through Ray's object store to the
  writer's node (caller NIC out -> writer node NIC in). The writer then uploads to storage (writer
  node NIC out). So nearly every byte crosses the network twice, and the writer nodes' NICs and the
  writers' own throughput carry the whole cluster's checkpoints.
- **node-local writers**: every node has ``--writers-per-node`` writers; a caller stages in its
  node's shared memory and its node's writer uploads to storage. Bytes cross the network once, from
  each node's own NIC; only a small control message per save (``--control-bytes``) goes to the
  key's "home" actor, which orders the saves of that key.

For each design the time per round is the largest of ``bytes through a resource / its bandwidth``
over the resources bytes pass through (each writer node's NIC in and out, each writer process, the
storage's aggregate bandwidth, each caller node's NIC out), and that resource is the bottleneck.

Assumptions:
- Bandwidth-bound steady state: every resource streams at its full rate and the resources overlap
  perfectly (pipelined); latency, start-up, Ray's scheduling and the object store's own copies are
  not modelled, and Ray's object transfers are taken to reach NIC line rate.
- Every client takes part in every round and saves all its checkpoints once per round; the per-round
  state file (--state-mb) is one more save per client when it is not 0.
- Keys are spread evenly over the pool's writers by their hash, so a client on a writer's node
  reaches its own node's writer for 1/W of its saves: 1/N of all saves stay on their node.
- Storage is reached over the network from every node (a shared file system or an object store),
  limited only by each node's NIC and the storage's aggregate bandwidth; NICs are full duplex.
- A writer process pushes --writer-gbps through checksum + upload for the bytes it writes; a copy it
  only hard-links (--dedup-post-aggregation) costs it nothing here.
- No compression. No deduplication unless --dedup-post-aggregation: fedckpt stores identical
  content once (a hard link), and every client's post-aggregation checkpoint is the same global
  model, so with the option each node writes that model once per round (node-local writers) and each
  pool writer writes it once per round; in the pool this happens at the writer, after the transfer,
  so the bytes shipped to the writers do not drop. One of the --checkpoints-per-client model
  checkpoints is taken to be the post-aggregation one.
- Control messages (node-local design) are counted in the network bytes and each node's NIC out;
  the pool's Ray call messages are as small and are left out.
- Units: MB = 10^6 bytes, GB = 10^9 bytes, Gbit/s = 10^9 bits per second.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields, replace

from rich.console import Console
from rich.table import Table

MB = 1e6
GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """The cluster, the simulation and the checkpoints of one round."""

    nodes: int = 64
    clients_per_node: int = 8
    model_mb: float = 100.0  # MB per model checkpoint
    checkpoints_per_client: int = 2  # model checkpoints per client per round (pre- and post-aggregation)
    state_mb: float = 0.0  # MB of one per-round state file per client (0: none)
    nic_gbps: float = 25.0  # Gbit/s per node, each direction
    storage_gbps: float = 100.0  # GB/s, the storage's aggregate bandwidth
    writer_gbps: float = 1.5  # GB/s one writer process pushes through checksum + upload
    pool_writers: int = 2  # writers in the fixed pool
    writers_per_node: int = 1  # writers per node, node-local design
    control_bytes: int = 512  # bytes of control messages per save, node-local design
    dedup_post_aggregation: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.pool_writers <= self.nodes:
            raise ValueError(f"--pool-writers must be between 1 and --nodes ({self.nodes}), got {self.pool_writers}")
        if min(self.nic_gbps, self.storage_gbps, self.writer_gbps) <= 0:
            raise ValueError("--nic-gbps, --storage-gbps and --writer-gbps must be above 0")
        if self.writers_per_node < 1:
            raise ValueError(f"--writers-per-node must be at least 1, got {self.writers_per_node}")
        if self.dedup_post_aggregation and self.checkpoints_per_client < 1:
            raise ValueError("--dedup-post-aggregation needs at least one model checkpoint per client")

    @property
    def clients(self) -> int:
        return self.nodes * self.clients_per_node

    @property
    def saves_per_client(self) -> int:
        """Saves per client per round: its model checkpoints, and its state file if it has one."""
        return self.checkpoints_per_client + (1 if self.state_mb > 0 else 0)

    @property
    def client_bytes(self) -> float:
        """Checkpoint bytes one client saves per round."""
        return self.checkpoints_per_client * self.model_mb * MB + self.state_mb * MB

    @property
    def checkpoint_bytes(self) -> float:
        """Checkpoint bytes the whole cluster saves per round."""
        return self.clients * self.client_bytes

    @property
    def nic_bytes_per_s(self) -> float:
        return self.nic_gbps * GB / 8

    def written(self, clients: float) -> float:
        """Bytes one writer (or one node's writers) writes for the saves of ``clients`` clients: with
        dedup, their post-aggregation copies of the global model become one write of it."""
        if not self.dedup_post_aggregation:
            return clients * self.client_bytes
        return clients * (self.client_bytes - self.model_mb * MB) + self.model_mb * MB


@dataclass(frozen=True)
class Resource:
    """One resource bytes pass through: the busiest instance of it, per round."""

    name: str
    bytes: float
    bytes_per_s: float

    @property
    def seconds(self) -> float:
        return self.bytes / self.bytes_per_s


@dataclass(frozen=True)
class DesignResult:
    """What one design moves per round and how long its busiest resource takes."""

    design: str
    checkpoint_bytes: float
    written_bytes: float
    network_bytes: float
    resources: list[Resource]

    @property
    def bottleneck(self) -> Resource:
        return max(self.resources, key=lambda resource: resource.seconds)

    @property
    def seconds(self) -> float:
        """Seconds per round until every checkpoint of the round is on storage."""
        return self.bottleneck.seconds


def pool_design(cluster: Cluster) -> DesignResult:
    """Today's pool: W writers on W nodes, each owning 1/W of the keys, fed through Ray's object store."""
    nodes, per_node, writers = cluster.nodes, cluster.clients_per_node, cluster.pool_writers
    node_bytes = per_node * cluster.client_bytes
    # Writer j gets 1/W of every client's bytes; its own node's clients' share arrives by shared memory.
    received_remote = (nodes - 1) * node_bytes / writers
    written_per_writer = cluster.written(cluster.clients / writers)
    sent_by_writer_node = node_bytes * (writers - 1) / writers  # its clients' saves owned by other writers
    shipped = writers * received_remote  # caller -> writer transfers: (N - 1) / N of all bytes
    resources = [
        Resource("writer node NIC in", received_remote, cluster.nic_bytes_per_s),
        Resource("writer node NIC out", written_per_writer + sent_by_writer_node, cluster.nic_bytes_per_s),
        Resource("writer process", written_per_writer, cluster.writer_gbps * GB),
        Resource("storage (aggregate)", writers * written_per_writer, cluster.storage_gbps * GB),
    ]
    if writers < nodes:
        resources.append(Resource("caller node NIC out", node_bytes, cluster.nic_bytes_per_s))
    return DesignResult(
        design="fixed pool",
        checkpoint_bytes=cluster.checkpoint_bytes,
        written_bytes=writers * written_per_writer,
        network_bytes=shipped + writers * written_per_writer,
        resources=resources,
    )


def node_local_design(cluster: Cluster) -> DesignResult:
    """Node-local writers: each node's writers upload its own clients' checkpoints from shared memory."""
    written_per_node = cluster.written(cluster.clients_per_node)
    control_per_node = cluster.clients_per_node * cluster.saves_per_client * cluster.control_bytes
    resources = [
        Resource("node NIC out", written_per_node + control_per_node, cluster.nic_bytes_per_s),
        Resource("writer process", written_per_node / cluster.writers_per_node, cluster.writer_gbps * GB),
        Resource("storage (aggregate)", cluster.nodes * written_per_node, cluster.storage_gbps * GB),
    ]
    return DesignResult(
        design="node-local writers",
        checkpoint_bytes=cluster.checkpoint_bytes,
        written_bytes=cluster.nodes * written_per_node,
        network_bytes=cluster.nodes * (written_per_node + control_per_node),
        resources=resources,
    )


def gb(value: float) -> str:
    return f"{value / GB:,.2f} GB"


def seconds(value: float) -> str:
    return f"{value:,.2f} s"


def ratio(value: float) -> str:
    return f"{value:.3f}x"


def print_assumptions(console: Console) -> None:
    """The docstring's assumptions, as printed with every run (one place to keep them)."""
    console.print("[bold]Assumptions[/bold]")
    console.print((__doc__ or "").split("Assumptions:", 1)[1].strip("\n"), markup=False, highlight=False)


def print_summary(console: Console, cluster: Cluster, pool: DesignResult, local: DesignResult) -> None:
    """Bytes per round (the same at every NIC speed) and the pool's locality."""
    console.print(
        f"[bold]Cluster[/bold]: {cluster.nodes} nodes x {cluster.clients_per_node} clients = {cluster.clients} "
        f"clients; {cluster.checkpoints_per_client} x {cluster.model_mb:g} MB model checkpoints"
        + (f" + a {cluster.state_mb:g} MB state file" if cluster.state_mb > 0 else "")
        + f" per client per round; storage {cluster.storage_gbps:g} GB/s aggregate; {cluster.writer_gbps:g} GB/s "
        f"per writer process; pool of {cluster.pool_writers} writers, {cluster.writers_per_node} writer(s) per node"
        + ("; post-aggregation copies deduplicated" if cluster.dedup_post_aggregation else "")
    )
    console.print(
        f"Pool: callers on a writer's node {cluster.pool_writers}/{cluster.nodes} "
        f"({cluster.pool_writers / cluster.nodes:.1%}); saves that stay on their node 1/{cluster.nodes} "
        f"({1 / cluster.nodes:.1%}: a key's writer is chosen by its hash, not by the caller's node)"
    )
    control = cluster.clients * cluster.saves_per_client * cluster.control_bytes
    console.print(f"Node-local control messages: {control / 1e3:,.0f} KB per round, in its network bytes")
    table = Table(title="Bytes per round")
    for column in ("design", "checkpoint bytes", "written to storage", "over the network", "network / checkpoint"):
        table.add_column(column, justify="left" if column == "design" else "right")
    for result in (pool, local):
        table.add_row(
            result.design,
            gb(result.checkpoint_bytes),
            gb(result.written_bytes),
            gb(result.network_bytes),
            ratio(result.network_bytes / result.checkpoint_bytes),
        )
    table.add_row("node-local / pool", "", ratio(local.written_bytes / pool.written_bytes),
                  ratio(local.network_bytes / pool.network_bytes), "")  # fmt: skip
    console.print(table)


def print_resources(console: Console, cluster: Cluster, results: list[DesignResult]) -> None:
    """Every resource's bytes and time at ``cluster.nic_gbps``: the numbers behind the sweep's row."""
    table = Table(title=f"Per resource, NIC {cluster.nic_gbps:g} Gbit/s (the busiest instance of each)")
    for column in ("design", "resource", "bytes per round", "bandwidth", "seconds"):
        table.add_column(column, justify="left" if column in ("design", "resource") else "right")
    for result in results:
        for resource in result.resources:
            mark = " <- bottleneck" if resource is result.bottleneck else ""
            table.add_row(result.design, resource.name + mark, gb(resource.bytes),
                          f"{resource.bytes_per_s / GB:,.3f} GB/s", seconds(resource.seconds))  # fmt: skip
    console.print(table)


def print_sweep(console: Console, cluster: Cluster, nics: list[float]) -> None:
    """One row per NIC speed: each design's time per round, its bottleneck, and node-local / pool."""
    table = Table(title="Time per round until every checkpoint is on storage")
    columns = ("NIC Gbit/s", "pool", "pool bottleneck", "node-local", "node-local bottleneck", "node-local / pool")
    for column in columns:
        table.add_column(column, justify="left" if "bottleneck" in column else "right")
    for nic in nics:
        at_speed = replace(cluster, nic_gbps=nic)
        pool, local = pool_design(at_speed), node_local_design(at_speed)
        table.add_row(f"{nic:g}", seconds(pool.seconds), pool.bottleneck.name, seconds(local.seconds),
                      local.bottleneck.name, ratio(local.seconds / pool.seconds))  # fmt: skip
    console.print(table)


# Each Cluster field's command-line help (the option is the field's name with dashes).
OPTION_HELP = {
    "nodes": "nodes in the cluster",
    "clients_per_node": "Flower clients (ClientApps) per node",
    "model_mb": "MB (10^6 bytes) per model checkpoint",
    "checkpoints_per_client": "model checkpoints per client per round, e.g. FL4Health's pre- and post-aggregation ones",
    "state_mb": "MB of a per-round state file per client, 0 for none",
    "nic_gbps": "NIC bandwidth per node in Gbit/s, full duplex, for the per-resource table",
    "storage_gbps": "aggregate storage bandwidth in GB/s: an object store scales by prefix; an NFS box might give 2",
    "writer_gbps": "GB/s one writer process pushes through checksum + upload",
    "pool_writers": "writers in the fixed pool, at most one per node",
    "writers_per_node": "writers per node in the node-local design",
    "control_bytes": "bytes of control messages per save to the key's home actor, node-local design",
    "dedup_post_aggregation": "write every client's post-aggregation copy of the global model once per node "
    "(node-local) or once per writer (pool, after the transfer)",
}


def parse_args(argv: list[str] | None = None) -> tuple[Cluster, list[float]]:
    defaults = Cluster()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    for option in fields(Cluster):
        flag, default = "--" + option.name.replace("_", "-"), getattr(defaults, option.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=OPTION_HELP[option.name])
        else:
            help_text = f"{OPTION_HELP[option.name]} (default: %(default)s)"
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
    parser.add_argument("--nics", type=float, nargs="+", default=[10.0, 25.0, 100.0],
                        help="NIC speeds in Gbit/s for the sweep (default: 10 25 100)")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.nics) <= 0:
        parser.error("--nics must all be above 0")
    try:
        cluster = Cluster(**{option.name: getattr(args, option.name) for option in fields(Cluster)})
    except ValueError as error:
        parser.error(str(error))
    return cluster, args.nics


def main(argv: list[str] | None = None) -> None:
    cluster, nics = parse_args(argv)
    pool, local = pool_design(cluster), node_local_design(cluster)
    console = Console(width=None if sys.stdout.isatty() else 120)  # piped: wide enough for the tables
    print_summary(console, cluster, pool, local)
    print_resources(console, cluster, [pool, local])
    print_sweep(console, cluster, nics)
    print_assumptions(console)


if __name__ == "__main__":
    main()
