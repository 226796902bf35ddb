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

from fedckpt.runtime.messages import Outcome, PoolShape, SaveRequest, SharedMemoryPayload, WriterStats
from fedckpt.runtime.shards import shard_of
from fedckpt.runtime.writer.io import SaveIO, WriteOutcome, transportable
from fedckpt.runtime.writer.metrics import WriterMetrics
from fedckpt.runtime.writer.process import run_as_batch_work, wait_for_job_end
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
        run_as_batch_work()
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
        self, request: SaveRequest, sequence: tuple[int, int], payload: SharedMemoryPayload
    ) -> WriteOutcome:
        """Write one save staged on this node; storage publishes it only over an older version."""
        save = QueuedSave(request, tuple(sequence), payload, asyncio.get_running_loop().create_future())
        self.metrics.arrived()
        try:
            self.io.map_segment(save)
        except OSError as error:  # its caller's segment is gone: nothing of it can be written
            written = WriteOutcome(Outcome.FAILED, transportable(error))
        else:
            written = await self.io.write(save)
        save.segment = None
        if written.persisted is not None:
            self.metrics.persisted(written.persisted.entry.bytes, written.persisted.linked)
        self.metrics.finished(written.outcome, time.monotonic() - save.arrived)
        return written

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

    async def write(self, save: QueuedSave) -> WriteOutcome:
        payload = save.payload
        assert isinstance(payload, SharedMemoryPayload)
        name = node_writer_of(save.request.key, payload.node_id, self.shape.writers_per_node)
        try:
            handle = self.handles.get(name)
            if handle is None:
                loop = asyncio.get_running_loop()
                handle = await loop.run_in_executor(None, lambda: ray.get_actor(name, namespace=self.shape.namespace))
                self.handles[name] = handle
            return await handle.write.remote(save.request, save.sequence, payload)
        except (ValueError, ray.exceptions.RayError) as error:  # its node is gone, and the writer with it
            self.handles.pop(name, None)
            return await asyncio.get_running_loop().run_in_executor(None, _outcome_after_loss, save, error)


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
