"""``fedckpt status``: the live writer pools of a Ray cluster, their queues and throughput.

Connects to the cluster as a Ray driver of its own, finds every fedckpt writer (named actors, in
every namespace) and reads its counters twice, ``interval`` seconds apart, for the rates.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import ray

from fedckpt.runtime.messages import WriterStats

# A home (``fedckpt-writer-<index>``) or a node writer (``fedckpt-node-<node id>-<index>``).
WRITER_NAME = re.compile(r"^fedckpt-(?:writer-(?P<home>\d+)|node-(?P<node>[0-9a-f]+)-(?P<slot>\d+))$")
STATS_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class WriterStatus:
    """One writer as ``fedckpt status`` shows it."""

    namespace: str
    writer: str  # a home's index ("0"), or a node writer's node and index ("1a2b3c4d/0")
    node_ip: str
    stats: WriterStats
    saves_per_second: float
    bytes_per_second: float


def live_writers(interval: float) -> list[WriterStatus]:
    """Every fedckpt writer of the connected cluster, sorted by pool and index."""
    handles = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        match = WRITER_NAME.match(actor["name"])
        handle = _handle_of(actor) if match else None
        if handle is not None:
            home = match["home"]
            label = home if home is not None else f"{match['node'][:8]}/{match['slot']}"
            handles[(actor["namespace"], home is None, label)] = handle
    first = _read(handles)
    started = time.monotonic()
    time.sleep(interval)  # a measurement window for the rates, not a synchronisation
    second = _read(handles)
    elapsed = time.monotonic() - started
    ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    statuses = []
    for where, now in sorted(second.items()):
        before = first.get(where, now)
        statuses.append(
            WriterStatus(
                namespace=where[0],
                writer=where[2],
                node_ip=ips.get(now.node_id, now.node_id[:8]),
                stats=now,
                saves_per_second=(_finished(now) - _finished(before)) / elapsed,
                bytes_per_second=(now.bytes_written - before.bytes_written) / elapsed,
            )
        )
    return statuses


def _handle_of(actor: dict[str, str]) -> Any | None:
    """The named actor's handle, or None when it died between being listed and being looked up."""
    try:
        return ray.get_actor(actor["name"], namespace=actor["namespace"])
    except ValueError:
        return None


def _finished(stats: WriterStats) -> int:
    return stats.saved + stats.superseded + stats.failed + stats.abandoned


def _read(handles: dict[tuple[str, bool, str], Any]) -> dict[tuple[str, bool, str], WriterStats]:
    """Each writer's counters; a writer that does not answer (restarting, or gone) is left out."""
    refs = {where: handle.stats.remote() for where, handle in handles.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=STATS_TIMEOUT_SECONDS)
    answered = set(ready)
    counters = {}
    for where, ref in refs.items():
        if ref in answered:
            try:
                counters[where] = ray.get(ref)
            except ray.exceptions.RayError:
                continue
    return counters
