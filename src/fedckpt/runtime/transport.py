"""How a snapshot's bytes and its save messages reach the writers.

The snapshot is copied into a reused shared-memory segment of this node (Ray's object store only
where ``/dev/shm`` is not usable, or ``shared_memory_staging=False``). Then, per key's home writer:

* a home on this process's node maps the segment; the save takes its sequence from the home's
  counter and goes over the node-local channel as one message, which nothing waits on; the home
  pushes a ``SaveDone`` notice back when the save left its memory, read at this process's next call;
* a home on another node gets Ray calls (``enqueue``, then ``wait_saved`` to hear when it is done)
  naming the segment and this node, and has this node's writer write the bytes: they never leave
  the node (docs/design.md: clusters). The node's writers are started by its first such save.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from functools import partial
from typing import Any

import numpy as np
import ray

from fedckpt.runtime import stats
from fedckpt.runtime.channel import ChannelClient, ChannelClosed, channel_supported
from fedckpt.runtime.messages import (
    Ack,
    Enqueue,
    ObjectStorePayload,
    Payload,
    SaveDone,
    SaveRequest,
    SharedMemoryPayload,
    WaitCall,
)
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.sequence import SequenceCounter
from fedckpt.runtime.staging import Segment, StagingArena, StagingFull, shared_memory_available
from fedckpt.snapshot import Snapshot

log = logging.getLogger("fedckpt")


class Route(Enum):
    CHANNEL = "channel"  # shared memory and the node-local channel
    RAY = "ray"  # Ray's object store and Ray calls


@dataclass(eq=False)
class Staged:
    """One snapshot's bytes, copied out of the caller's tensors, with how they are sent."""

    nbytes: int
    segment: Segment | None  # the shared-memory segment, back to the arena once every save of it is done
    payload: Payload


@dataclass(frozen=True)
class Enqueued:
    """One request on its way: its sequence (``ack``), the route it took, (Ray) the call that
    resolves when the save left the writer, and the request as sent."""

    ack: Ack
    route: Route
    done_ref: Any
    request: SaveRequest
    channel: ChannelClient | None = None  # the channel that carried it (channel route)


class Transport:
    """Staging memory and the channels of this process."""

    def __init__(self, shared_memory: bool, max_staging_bytes: int, on_done: Callable[[int, list[SaveDone]], None]):
        usable = shared_memory and shared_memory_available() and channel_supported()
        self.arena = StagingArena(max_staging_bytes) if usable else None
        self._on_done = on_done
        self._channels: dict[int, ChannelClient] = {}
        self._counters: dict[int, SequenceCounter] = {}  # of the writers on this node
        self._lock = threading.Lock()
        self.node_id: str | None = None
        self._warned_staging_full = False

    # ---- routes and channels ----------------------------------------------------------------

    def route(self, pool: WriterPool, index: int, staged: Staged | None = None) -> Route:
        """The channel for a home on this node (and bytes in shared memory), Ray otherwise."""
        if self.arena is None or (staged is not None and staged.segment is None):
            return Route.RAY
        info = pool.infos[index]
        return Route.CHANNEL if info.node_id == self.node() and info.channel_address else Route.RAY

    def node(self) -> str:
        """This process's Ray node."""
        if self.node_id is None:
            self.node_id = ray.get_runtime_context().get_node_id()
        return self.node_id

    def channel(self, pool: WriterPool, index: int) -> ChannelClient:
        """The open channel to writer ``index`` (connected on first use)."""
        with self._lock:
            client = self._channels.get(index)
            if client is not None and not client.closed:
                return client
            address = pool.infos[index].channel_address
            assert address is not None
            client = ChannelClient(address, lambda notices: self._on_done(index, notices))
            self._channels[index] = client
            return client

    def connect(self, pool: WriterPool, index: int) -> None:
        """Open the channel to writer ``index`` (on this node) and map its counter, ahead of a save."""
        self.channel(pool, index)
        if pool.infos[index].counter_path is not None:
            self._counter(pool, index)

    def sequences(self, pool: WriterPool, index: int, count: int) -> list[tuple[int, int]]:
        """``count`` sequences from the counter of writer ``index`` (on this node)."""
        first = self._counter(pool, index).take(count)
        return [(pool.infos[index].epoch, number) for number in range(first, first + count)]

    def _counter(self, pool: WriterPool, index: int) -> SequenceCounter:
        info = pool.infos[index]
        assert info.counter_path is not None
        with self._lock:
            counter = self._counters.get(index)
            if counter is None or counter.path != info.counter_path:  # a new incarnation
                if counter is not None:
                    counter.close()
                counter = self._counters[index] = SequenceCounter(info.counter_path)
        return counter

    def open_channels(self) -> dict[int, ChannelClient]:
        with self._lock:
            return {index: client for index, client in self._channels.items() if not client.closed}

    def drop_channel(self, index: int) -> None:
        with self._lock:
            client = self._channels.pop(index, None)
        if client is not None:
            client.close()

    def take_in_notices(self) -> None:
        """Read the done notices that arrived on every channel (without waiting)."""
        for index, client in self.open_channels().items():
            try:
                client.pump(0.0)
            except ChannelClosed:
                log.debug("fedckpt: the channel to writer %d closed", index)

    # ---- staging and sending --------------------------------------------------------------------

    def stage(self, snapshot: Snapshot, shared_memory: bool) -> Staged:
        """The blocking copy: into a reused shared-memory segment, or into Ray's object store."""
        if shared_memory:
            assert self.arena is not None
            try:
                segment = self.arena.acquire(snapshot.nbytes)
            except StagingFull as error:
                self._warn_staging_full(snapshot.nbytes, error)
                return self.stage(snapshot, shared_memory=False)
            try:
                snapshot.copy_into(segment.array)
            except BaseException:
                self.arena.release(segment)
                raise
            payload = SharedMemoryPayload(segment.path, snapshot.nbytes, snapshot.packed_layout, self.node())
            stats.recorder.add(bytes_shared_memory=snapshot.nbytes)
            return Staged(snapshot.nbytes, segment, payload)
        array = np.empty(snapshot.nbytes, dtype=np.uint8)
        snapshot.copy_into(array)
        payload = _object_store_payload(snapshot.packed_layout, array)
        stats.recorder.add(bytes_object_store=snapshot.nbytes)
        return Staged(snapshot.nbytes, None, payload)

    def _warn_staging_full(self, nbytes: int, error: StagingFull) -> None:
        """Once per process: the save goes on through Ray's object store, slower."""
        if self._warned_staging_full:
            return
        self._warned_staging_full = True
        message = (
            f"fedckpt: {error.strerror}: a {nbytes / (1 << 20):.1f} MiB save is staged through Ray's object "
            "store instead (slower; the save itself is not affected). Give the container more shared memory "
            "(docker run --shm-size=4g, or in Kubernetes an emptyDir with medium: Memory mounted at /dev/shm), "
            "or lower fedckpt.init(max_inflight_bytes=...)."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def can_reuse(self, nbytes: int) -> bool:
        """Whether a free staging segment fits ``nbytes`` (or none is needed)."""
        return self.arena is None or self.arena.has_free(nbytes)

    def release(self, staged: Staged) -> None:
        if staged.segment is not None and self.arena is not None:
            self.arena.release(staged.segment)
            staged.segment = None

    def enqueue(
        self, pool: WriterPool, staged: Staged, requests: dict[int, list[SaveRequest]]
    ) -> dict[int, list[Enqueued] | ChannelClosed]:
        """Send each writer its requests: over its channel without waiting, or with Ray calls (all
        first, then their answers).

        A writer whose channel closed is answered with the ``ChannelClosed`` error: the caller
        recovers it and sends the requests again.
        """
        routes = {index: self.route(pool, index, staged) for index in requests}
        calls: dict[int, Any] = {}
        for index, group in requests.items():
            if routes[index] is Route.CHANNEL:
                assert isinstance(staged.payload, SharedMemoryPayload)
                try:
                    client = self.channel(pool, index)
                    if any(request.sequence is None for request in group):
                        numbers = iter(self.sequences(pool, index, len(group)))
                        group = [replace(r, sequence=r.sequence or next(numbers)) for r in group]  # noqa: PLW2901
                    client.post(Enqueue(group, staged.payload))
                    calls[index] = (group, client)
                except ChannelClosed as error:
                    calls[index] = error
            else:
                if isinstance(staged.payload, SharedMemoryPayload):
                    pool.ensure_node_writers(staged.payload.node_id)  # they write it for the home
                calls[index] = [pool.handles[index].enqueue.remote(request, staged.payload) for request in group]
        answers: dict[int, list[Enqueued] | ChannelClosed] = {}
        for index, call in calls.items():
            if isinstance(call, ChannelClosed):
                answers[index] = call
            elif routes[index] is Route.CHANNEL:
                epoch, (group, client) = pool.infos[index].epoch, call
                answers[index] = [
                    Enqueued(Ack(request.sequence, epoch), Route.CHANNEL, None, request, client) for request in group
                ]
            else:
                acks = ray.get(call)
                answers[index] = [
                    Enqueued(ack, Route.RAY, self._done_ref(pool, index, request, ack), request)
                    for request, ack in zip(requests[index], acks, strict=True)
                ]
        return answers

    @staticmethod
    def _done_ref(pool: WriterPool, index: int, request: SaveRequest, ack: Ack) -> Any:
        return pool.handles[index].wait_saved.remote(request.key, ack.sequence, ack.writer_epoch)

    def wait(
        self, pool: WriterPool, index: int, keys: list[str] | None, timeout: float | None
    ) -> dict[str, BaseException]:
        """Wait until writer ``index`` wrote every save of ``keys`` (None: all) issued before now;
        returns (and clears) their errors."""
        if self.route(pool, index) is Route.CHANNEL:
            if pool.infos[index].counter_path is not None and self._counter(pool, index).quiet():
                return {}  # every save numbered so far is written, and no error is held
            return self.channel(pool, index).call(partial(WaitCall, keys=keys), timeout)
        return ray.get(pool.handles[index].flush.remote(keys), timeout=timeout)

    def close_channels(self) -> None:
        """Close every channel (the pool is gone, or Ray was replaced: so may be this node's id)."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            counters, self._counters = list(self._counters.values()), {}
            self.node_id = None
        for client in channels:
            client.close()
        for counter in counters:
            counter.close()

    def close(self) -> None:
        """Close the channels and unmap and remove every staging segment."""
        self.close_channels()
        if self.arena is not None:
            self.arena.close()


def _object_store_payload(layout: bytes, array: np.ndarray) -> ObjectStorePayload:
    return ObjectStorePayload([ray.put(array)], array.nbytes, layout)
