"""Node writers: the writers of a node's staged saves whose keys' homes run on other nodes.

A key's home (:mod:`~fedckpt.runtime.writer.actor`) orders its saves and knows what is pending; the
bytes of a save stay in the shared memory of the node that staged them, and the writer of that node
writes them when the home says so (docs/design.md: clusters). A node writer keeps no queue and
decides nothing: it writes one save per call and answers how that went. It is pinned to its node and
goes with it; Ray restarts it there after a crash and delivers the home's call again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fedckpt.runtime import failpoints, tickets
from fedckpt.runtime.messages import Outcome, PoolShape, SaveRequest, SharedMemoryPayload, WriterStats
from fedckpt.runtime.shards import shard_of
from fedckpt.runtime.staging import PREFIX, SHM_DIR
from fedckpt.runtime.writer.io import SaveIO, WriteOutcome, transportable
from fedckpt.runtime.writer.metrics import WriterMetrics
from fedckpt.runtime.writer.process import actor_options, run_as_background_work, wait_for_job_end
from fedckpt.runtime.writer.queue import QueuedSave
from fedckpt.storage.base import storage_for

log = logging.getLogger("fedckpt.writer")


NODE_WRITER_PREFIX = "fedckpt-node-"


def node_writer_name(node_id: str, index: int) -> str:
    return f"{NODE_WRITER_PREFIX}{node_id}-{index}"


def node_writer_of(key: str, node_id: str, writers_per_node: int) -> str:
    """The name of the writer on ``node_id`` that writes ``key``'s saves staged there."""
    return node_writer_name(node_id, shard_of(key, writers_per_node))


class NodeLostError(RuntimeError):
    """An acknowledged save whose bytes were staged on a node that is gone: nothing is left to write."""


class NodeWriter:
    """Ray actor body; see :func:`node_writer_actor_class` for the options it runs with."""

    def __init__(self, node_id: str, index: int, shape: PoolShape) -> None:
        run_as_background_work()
        self.node_id = ray.get_runtime_context().get_node_id()
        assert self.node_id == node_id, f"node writer for {node_id} started on {self.node_id}"
        self.shape = shape
        self.name = f"node-{node_id[:8]}-{index}@{os.getpid()}"
        self.io = SaveIO(shape.io_threads, self.name)
        self.metrics = WriterMetrics(shape.namespace, node_writer_name(node_id, index))
        self._watching_job: asyncio.Task | None = None

    async def describe(self) -> WriterStats:
        """This writer's counters; the first call also ends it with its job (a job's own pool)."""
        if self.shape.job_id is not None and self._watching_job is None:
            self._watching_job = asyncio.get_running_loop().create_task(self._end_with_job(self.shape.job_id))
        return await self.stats()

    async def _end_with_job(self, job_id: str) -> None:
        await wait_for_job_end(job_id)
        self.io.shutdown()  # lets a write in progress finish
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def write(
        self, request: SaveRequest, sequence: tuple[int, int], payload: SharedMemoryPayload, look_first: bool = False
    ) -> WriteOutcome:
        """Write one save staged on this node; storage publishes it only over an older version
        (``look_first``: a save sent again is checked against storage before it is written)."""
        await failpoints.reach_async("node_writer.writing", key=request.key)
        save = QueuedSave(request, tuple(sequence), payload, asyncio.get_running_loop().create_future())
        self.metrics.arrived()
        try:
            self.io.map_segment(save)
        except OSError as error:  # its caller's segment is gone: nothing of it can be written
            written = WriteOutcome(Outcome.FAILED, transportable(error))
        else:
            written = await self.io.write(save, look_first)
        save.segment = None
        if written.persisted is not None:
            self.metrics.persisted(written.persisted.entry.bytes, written.persisted.linked)
        self.metrics.finished(written.outcome, time.monotonic() - save.arrived)
        return written

    async def scan(self, home: int) -> list[tickets.FoundSave]:
        """The saves staged on this node that were sent to home ``home`` and are not known finished
        (a restarted home asks: see :mod:`fedckpt.runtime.tickets`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, tickets.scan, SHM_DIR, PREFIX, self.shape.namespace, home, self.node_id)

    async def stats(self) -> WriterStats:
        counts = self.metrics.counts
        return WriterStats(
            saved=counts[Outcome.SAVED], superseded=counts[Outcome.SUPERSEDED], failed=counts[Outcome.FAILED],
            abandoned=counts[Outcome.ABANDONED], keys=0, pending=0, awaiting_resend=0,
            bytes_written=self.metrics.bytes_written, bytes_linked=self.metrics.bytes_linked, pid=os.getpid(),
            node_id=self.node_id,
        )  # fmt: skip

    async def stop(self) -> None:
        """End this actor once the writes it was given are done (it is not restarted)."""
        self.io.shutdown()
        ray.actor.exit_actor()


class NodeWriters:
    """A home's side: has each save staged on another node written by that node's writer."""

    def __init__(self, shape: PoolShape) -> None:
        self.shape = shape
        self.handles: dict[str, Any] = {}

    async def write(self, save: QueuedSave, look_first: bool = False) -> WriteOutcome:
        payload = save.payload
        assert isinstance(payload, SharedMemoryPayload)
        name = node_writer_of(save.request.key, payload.node_id, self.shape.writers_per_node)
        try:
            handle = self.handles.get(name)
            if handle is None:
                loop = asyncio.get_running_loop()
                handle = await loop.run_in_executor(None, lambda: ray.get_actor(name, namespace=self.shape.namespace))
                self.handles[name] = handle
            return await handle.write.remote(save.request, save.sequence, payload, look_first)
        except (ValueError, ray.exceptions.RayError) as error:  # its node is gone, and the writer with it
            self.handles.pop(name, None)
            return await asyncio.get_running_loop().run_in_executor(None, _outcome_after_loss, save, error)

    async def scan(self, home: int, previous_node: str | None) -> list[tickets.FoundSave]:
        """What home ``home``'s predecessor was sent of the saves staged on other nodes: the tickets
        there, read by each node's writer. The predecessor's own node is asked too, its writers
        started if it has none (its callers used the channel, and they may be idle)."""
        loop = asyncio.get_running_loop()
        this_node = ray.get_runtime_context().get_node_id()
        nodes = await loop.run_in_executor(None, _nodes_with_writers, self.shape.namespace)
        alive = await loop.run_in_executor(None, _alive_nodes)
        if previous_node is not None and previous_node not in nodes | {this_node} and previous_node in alive:
            await loop.run_in_executor(None, start_node_writers, self.shape, previous_node)
            nodes.add(previous_node)
        asked = [
            ray.get_actor(node_writer_name(node, 0), namespace=self.shape.namespace).scan.remote(home)
            for node in sorted(nodes & alive - {this_node})
        ]
        found = []
        for answer in await asyncio.gather(*asked, return_exceptions=True):
            if isinstance(answer, BaseException):  # its node is going: the saves staged there go with it
                log.warning("fedckpt: a node writer could not be asked for its staged saves: %s", answer)
            else:
                found += answer
        return found


def _nodes_with_writers(namespace: str) -> set[str]:
    """The nodes that have writers of pool ``namespace``."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return {
        actor["name"][len(NODE_WRITER_PREFIX) :].rsplit("-", 1)[0]
        for actor in named
        if actor["namespace"] == namespace and actor["name"].startswith(NODE_WRITER_PREFIX)
    }


def _alive_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


def start_node_writers(shape: PoolShape, node_id: str) -> list[Any]:
    """Start (or find) the writers of node ``node_id``, pinned to it (they go when it goes)."""
    actor = node_writer_actor_class()
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    writers = [
        actor.options(
            **actor_options(shape.namespace, node_writer_name(node_id, index)), scheduling_strategy=strategy
        ).remote(node_id, index, shape)
        for index in range(shape.writers_per_node)
    ]
    ray.get([writer.describe.remote() for writer in writers])
    return writers


def _outcome_after_loss(save: QueuedSave, error: BaseException) -> WriteOutcome:
    """The save's node went while its writer had it: it may have published the save before its
    answer was lost, so storage tells. A save not there is lost with the node."""
    key = save.request.key
    try:
        entry = storage_for(key, save.request.storage_options).read_entry(key)
    except Exception:  # unreadable now: the save cannot be shown to be there
        entry = None
    if entry is not None and tuple(entry.sequence) >= save.sequence:
        return WriteOutcome(Outcome.SAVED if tuple(entry.sequence) == save.sequence else Outcome.SUPERSEDED)
    assert isinstance(save.payload, SharedMemoryPayload)
    lost = NodeLostError(
        f"the save of {key} (sequence {save.sequence}) was staged on node {save.payload.node_id}, whose "
        f"writer is gone ({type(error).__name__}): its node was lost with the bytes; the checkpoint keeps "
        "its last written version"
    )
    log.error("fedckpt: %s", lost)
    return WriteOutcome(Outcome.FAILED, lost)


def node_writer_actor_class() -> Any:
    """The actor class, built on first use so that importing fedckpt does not touch Ray."""
    return ray.remote(
        num_cpus=0,  # never take a CPU slot that Flower's ClientApp pool needs
        max_restarts=-1,  # on its own node only (hard node affinity)
        max_task_retries=-1,  # a home's write call reaches the restarted writer
    )(NodeWriter)
