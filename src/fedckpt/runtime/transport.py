"""How a snapshot's bytes and its save messages reach the writers.

The snapshot is copied into a reused shared-memory segment of this node (Ray's object store only
where ``/dev/shm`` is not usable, or ``shared_memory_staging=False``). Then, per key's home writer:

* a home on this process's node maps the segment; the save takes its sequence from the home's
  counter and goes over the node-local channel as one message, which nothing waits on; the home
  pushes a ``SaveDone`` notice back when the save left its memory, read at this process's next call;
* a home on another node gets Ray calls (``enqueue``, then ``wait_saved`` to hear when it is done)
  naming the segment and this node, and has this node's writer write the bytes: they never leave
  the node (docs/design.md: clusters). The node's writers are started by its first such save.

A snapshot with tensors on a CUDA device is staged by :mod:`~fedckpt.runtime.cuda`: its copies are
queued and :attr:`Staged.copy` is what they complete on; the save is sent only then
(:mod:`~fedckpt.runtime.completion`).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import numpy as np
import ray

from fedckpt.runtime import stats, tickets
from fedckpt.runtime.channel import ChannelClient, ChannelClosed, channel_supported
from fedckpt.runtime.cuda import DeviceStaging, PendingCopy
from fedckpt.runtime.messages import (
    Ack,
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
    RAY = "ray"  # Ray calls (the bytes: in shared memory on this node, or in Ray's object store)


@dataclass(eq=False)
class Staged:
    """One snapshot's bytes, copied out of the caller's tensors, with how they are sent."""

    nbytes: int
    segment: Segment | None  # the shared-memory segment, back to the arena once every save of it is done
    payload: Payload | None  # None only until ``copy`` completed (GPU bytes bound for Ray's object store)
    copy: PendingCopy | None = None  # GPU copies still in flight: the save is sent once they completed


class Transport:
    """Staging memory, tickets and the channels of this process; the Ray calls that carry saves."""

    def __init__(
        self,
        shared_memory: bool,
        max_staging_bytes: int,
        on_done: Callable[[list[SaveDone]], None],
        max_registered_bytes: int = 0,
    ) -> None:
        usable = shared_memory and shared_memory_available() and channel_supported()
        self.arena = StagingArena(max_staging_bytes) if usable else None
        self._max_registered_bytes = max_registered_bytes
        self._device: DeviceStaging | None = None  # made at the first GPU save (no CUDA call before)
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
            info = pool.infos[index]
            assert info.channel_address is not None
            client = ChannelClient(info.channel_address, self._on_done, epoch=info.epoch)
            self._channels[index] = client
            return client

    def connect(self, pool: WriterPool, index: int) -> None:
        """Open the channel to writer ``index`` (on this node) and map its counter, ahead of a save."""
        self.channel(pool, index)
        if pool.infos[index].counter_path is not None:
            self._counter(pool, index)

    def numbers(self, pool: WriterPool, index: int, keys: list[str]) -> Iterator[tuple[int, int]]:
        """A sequence from the counter of writer ``index`` (on this node) for each save of ``keys``. Every
        save posted takes one, a save sent again too (it keeps its own sequence): the writer counts
        arrivals by them, overall and per bucket of keys."""
        first = self._counter(pool, index).take(keys)
        return iter([(pool.infos[index].epoch, number) for number in range(first, first + len(keys))])

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

    def current_channel(self, index: int) -> ChannelClient | None:
        """The channel to writer ``index`` this process uses (closed or not), if any."""
        with self._lock:
            return self._channels.get(index)

    def open_channels(self) -> dict[int, ChannelClient]:
        with self._lock:
            return {index: client for index, client in self._channels.items() if not client.closed}

    def drop_channel(self, index: int, client: ChannelClient) -> None:
        """Forget ``client`` (its writer died), unless another channel to writer ``index`` replaced it."""
        with self._lock:
            if self._channels.get(index) is client:
                del self._channels[index]
        client.close()

    def take_in_notices(self) -> list[tuple[int, ChannelClient]]:
        """Read the notices that arrived on every channel (without waiting); returns the channels
        found closed (their writers died), for the caller to recover."""
        closed = []
        for index, client in self.open_channels().items():
            try:
                client.pump()
            except ChannelClosed:
                closed.append((index, client))
        return closed

    # ---- staging ----------------------------------------------------------------------------------

    def stage(self, snapshot: Snapshot, ticket_room: int, overlap: bool = False) -> Staged:
        """The blocking copy: into a reused shared-memory segment (with ``ticket_room`` bytes to
        spare at its end), or into Ray's object store. A snapshot on a GPU is not copied yet: its copies
        are queued (``overlap``: see :mod:`fedckpt.runtime.overlap_hooks`), and ``Staged.copy`` completes on them."""
        if snapshot.device_parts:
            return self._stage_from_device(snapshot, ticket_room, overlap)
        if self.arena is not None:
            try:
                segment = self.arena.acquire(snapshot.nbytes + ticket_room)
            except StagingFull as error:
                self._warn_staging_full(snapshot.nbytes, error)
            else:
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

    def _stage_from_device(self, snapshot: Snapshot, ticket_room: int, overlap: bool) -> Staged:
        if self._device is None:
            self._device = DeviceStaging(self._max_registered_bytes)
        device = self._device
        if self.arena is not None:
            try:
                segment = self.arena.acquire(snapshot.nbytes + ticket_room, prefer=device.pool.registered)
            except StagingFull as error:
                self._warn_staging_full(snapshot.nbytes, error)
            else:
                try:
                    copy = device.into_segment(snapshot, segment, overlap)
                except BaseException:
                    self.arena.release(segment)
                    raise
                payload = SharedMemoryPayload(segment.path, snapshot.nbytes, snapshot.packed_layout, self.node())
                stats.recorder.add(bytes_shared_memory=snapshot.nbytes)
                return Staged(snapshot.nbytes, segment, payload, copy)
        array, copy = device.into_pinned(snapshot, overlap)
        stats.recorder.add(bytes_object_store=snapshot.nbytes)
        if copy is None:
            return Staged(snapshot.nbytes, None, _object_store_payload(snapshot.packed_layout, array))
        staged = Staged(snapshot.nbytes, None, None, copy)
        copy.finish = partial(_put_in_object_store, staged, snapshot.packed_layout, array)
        return staged

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

    def write_ticket(self, staged: Staged, ticket: tickets.Ticket) -> None:
        """Record in the segment what is sent (before it is sent): see :mod:`fedckpt.runtime.tickets`."""
        if staged.segment is not None:
            tickets.write(memoryview(staged.segment.buffer), ticket, staged.nbytes)

    def release(self, staged: Staged) -> None:
        """Every save of ``staged`` is finished: its segment is free for the next snapshot."""
        if staged.copy is not None:  # normally completed already; not when saves were dropped (forget)
            staged.copy.complete(finish=False)
        if staged.segment is not None and self.arena is not None:
            tickets.clear(memoryview(staged.segment.buffer))
            self.arena.release(staged.segment)
            staged.segment = None

    # ---- Ray calls ----------------------------------------------------------------------------------

    @staticmethod
    def enqueue_by_ray(pool: WriterPool, index: int, requests: list[SaveRequest], staged: Staged,
                       timeout: float | None) -> list[Ack]:  # fmt: skip
        """Queue the requests at writer ``index`` with Ray calls; its acknowledgements. A writer on
        another node has this node's writer write bytes staged here: it is started first."""
        if isinstance(staged.payload, SharedMemoryPayload):
            pool.ensure_node_writers(staged.payload.node_id)
        handle = pool.handles[index]
        return ray.get([handle.enqueue.remote(request, staged.payload) for request in requests], timeout=timeout)

    @staticmethod
    def wait_saved_by_ray(pool: WriterPool, index: int, request: SaveRequest, ack: Ack) -> Any:
        """The call that resolves to the save's ``SaveDone`` once it left writer ``index``."""
        return pool.handles[index].wait_saved.remote(request.save_id, request.key, ack.sequence, ack.writer_epoch)

    def wait(
        self, pool: WriterPool, index: int, keys: list[str] | None, timeout: float | None
    ) -> dict[str, BaseException]:
        """Wait until writer ``index`` wrote every save of ``keys`` (None: all) issued before now,
        by any process; returns (and clears) their errors."""
        if self.route(pool, index) is Route.CHANNEL:
            if self.written(pool, index, keys):
                return {}
            return self.channel(pool, index).call(partial(WaitCall, keys=keys), timeout)
        return ray.get(pool.handles[index].flush.remote(keys), timeout=timeout)

    def written(self, pool: WriterPool, index: int, keys: list[str] | None) -> bool:
        """Whether writer ``index``, on this node, wrote every save (of ``keys``) numbered so far and
        holds no error: its counter says so without a round trip (False: ask the writer)."""
        if pool.infos[index].counter_path is None or self.route(pool, index) is not Route.CHANNEL:
            return False
        counter = self._counter(pool, index)
        return counter.quiet() or (keys is not None and counter.keys_quiet(keys))

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


def _put_in_object_store(staged: Staged, layout: bytes, array: np.ndarray) -> None:
    """A GPU snapshot's pinned buffer, its copies completed, into Ray's object store (no ``/dev/shm``)."""
    staged.payload = _object_store_payload(layout, array)
