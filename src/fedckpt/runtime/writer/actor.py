"""The writer actor: per-key ordered, coalescing, background persistence of snapshots.

Each checkpoint key is owned by one writer of a pool. For a key, saves are written one at a time in
sequence order, and a queued save is dropped once a newer one arrives (latest wins). File I/O runs
on a small thread pool, so the actor keeps answering while it writes.

Callers on the writer's node talk to it over the node-local channel (one message per save, a
``SaveDone`` notice back); callers on other nodes through Ray calls (``enqueue``, ``wait_saved``).
Both reach the same queues. What a restart loses, and how it is recovered, is in ``recovery.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from fedckpt.runtime import channel
from fedckpt.runtime.messages import (
    ABANDONED,
    FAILED,
    SAVED,
    SUPERSEDED,
    UNKNOWN,
    Ack,
    EnqueueCall,
    Payload,
    Reply,
    SaveDone,
    SaveRequest,
    WaitCall,
    WriterInfo,
    WriterStats,
)
from fedckpt.runtime.writer.queue import KeyQueue, QueuedSave
from fedckpt.runtime.writer.recovery import LostSaves
from fedckpt.runtime.writer.staged import CallerDied, StagedBytes
from fedckpt.storage.dedup import ContentIndex
from fedckpt.storage.local import Persisted, persist_checkpoint

log = logging.getLogger("fedckpt.writer")


def _lower_priority() -> None:
    """Run background I/O at a lower CPU priority (Linux: per thread), so that on a busy node
    training and this actor's own answers come first."""
    with contextlib.suppress(OSError):
        os.nice(10)


def _transportable(error: BaseException) -> BaseException:
    """The error itself when it can be sent to the caller, else a RuntimeError with its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _persist(save: QueuedSave, data: memoryview, writer_name: str, content_index: ContentIndex) -> Persisted | None:
    """The I/O thread's part of one save."""
    request = save.request
    layout = pickle.loads(save.payload.layout)
    return persist_checkpoint(
        request.key, request.kind, layout, data, save.sequence, request.score, request.score_name, writer_name,
        content_index,
    )  # fmt: skip


class CheckpointWriter:
    """Ray actor body; see :func:`writer_actor_class` for the options it runs with."""

    def __init__(self, index: int, pool_size: int, coalesce: bool, io_threads: int) -> None:
        self.index = index
        self.pool_size = pool_size
        self.coalesce = coalesce
        self.io_threads = io_threads
        # A new epoch per incarnation: sequences of a restarted writer sort after the old ones.
        self.epoch = time.time_ns()
        self.number = 0
        self.keys: dict[str, KeyQueue] = {}
        self.counts = {SAVED: 0, SUPERSEDED: 0, FAILED: 0, ABANDONED: 0}
        self.bytes_written = 0
        self.bytes_linked = 0
        self.io = ThreadPoolExecutor(
            max_workers=io_threads, thread_name_prefix="fedckpt-io", initializer=_lower_priority
        )
        self.staged = StagedBytes()
        self.content_index = ContentIndex()
        self.name = f"writer-{index}@{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.lost = LostSaves(_was_restarted(), self.name)
        self.channel_address = channel.new_address(f"writer-{index}") if channel.channel_supported() else None
        self._channel_server: asyncio.AbstractServer | None = None

    async def describe(self) -> WriterInfo:
        """Who this writer is; starts its channel first, so callers on its node can connect."""
        await self._serve_channel()
        return WriterInfo(
            index=self.index,
            pool_size=self.pool_size,
            coalesce=self.coalesce,
            io_threads=self.io_threads,
            epoch=self.epoch,
            restarted=self.lost.restarted,
            pid=os.getpid(),
            node_id=self.node_id,
            channel_address=self.channel_address,
        )

    async def _serve_channel(self) -> None:
        if self._channel_server is not None or self.channel_address is None:
            return
        try:
            self._channel_server = await channel.serve(self.channel_address, self._on_channel_message)
        except OSError as error:  # callers fall back to Ray calls
            log.warning("fedckpt: %s cannot serve its node-local channel: %s", self.name, error)
            self.channel_address = None

    def _on_channel_message(self, message: Any, connection: channel.ServerConnection) -> Any:
        if isinstance(message, EnqueueCall):
            acks = [self._enqueue(request, message.payload, connection) for request in message.requests]
            connection.send(Reply(message.call_id, acks))
            return None
        if isinstance(message, WaitCall):
            return self._answer_wait(message, connection)
        raise TypeError(f"unexpected message on the channel: {type(message).__name__}")

    async def _answer_wait(self, message: WaitCall, connection: channel.ServerConnection) -> None:
        connection.send(Reply(message.call_id, await self.flush(message.keys)))

    async def enqueue(self, request: SaveRequest, payload: Payload) -> Ack:
        """Queue a save and acknowledge at once (Ray calls: callers on other nodes)."""
        return self._enqueue(request, payload, None)

    def _enqueue(self, request: SaveRequest, payload: Payload, notify: channel.ServerConnection | None) -> Ack:
        """Queue a save; ``notify`` hears when it left memory. The write happens in the background."""
        state = self.keys.setdefault(request.key, KeyQueue())
        # A save sent again after a restart of this writer: nobody waits for its arrival any longer.
        awaited = None if request.sequence is None else self.lost.arrived(request.key, tuple(request.sequence))
        error = state.take_error()
        if error is None:
            try:
                segment = self.staged.map(payload)
            except OSError as failure:  # its caller's segment is gone: nothing of it can be written
                error = _transportable(failure)
        if error is not None:
            if awaited is not None:
                awaited.set_result(None)  # its caller hears of the error instead
            return Ack(sequence=None, error=error)
        if request.sequence is not None:
            sequence = tuple(request.sequence)
        else:
            self.number += 1
            sequence = (self.epoch, self.number)
        save = QueuedSave(request, sequence, payload, asyncio.get_running_loop().create_future(), segment)
        if notify is not None:
            save.outcome.add_done_callback(lambda done: notify.send(SaveDone(sequence, done.result())))
        if awaited is not None:  # from now on, waiting for the save itself covers it
            save.outcome.add_done_callback(lambda _: awaited.done() or awaited.set_result(None))
        for dropped in state.add(save, self.coalesce):
            self._finish(dropped, SUPERSEDED)
        if not state.draining:
            state.draining = True
            asyncio.get_running_loop().create_task(self._drain(request.key, state))
        return Ack(sequence=sequence, writer_epoch=self.epoch)

    async def wait_saved(self, key: str, sequence: tuple[int, int], writer_epoch: int) -> str:
        """Wait until one save left memory: saved, superseded, failed or abandoned.

        ``UNKNOWN`` when an earlier incarnation of this writer took the save: it died with it.
        """
        sequence = tuple(sequence)
        if writer_epoch != self.epoch:
            self.lost.expect(key, sequence)
            return UNKNOWN
        state = self.keys.get(key)
        save = state.find(sequence) if state else None
        if save is not None:
            return await save.outcome
        return SAVED if state is None or state.error is None else FAILED

    async def wait_key(self, key: str) -> BaseException | None:
        """Wait for every save of ``key`` issued before this call; return (and clear) its error."""
        return (await self.flush([key])).get(key)

    async def flush(self, keys: list[str] | None = None) -> dict[str, BaseException]:
        """Wait for every save (of ``keys``, or all) issued before this call, also those an earlier
        incarnation lost (until they are sent again); return and clear their errors."""
        await self.lost.settle_after_restart()
        selected = list(self.keys.keys() | self.lost.keys()) if keys is None else keys
        outcomes = [save.outcome for key in selected if key in self.keys for save in self.keys[key].pending()]
        await asyncio.gather(*outcomes, *self.lost.futures(selected))
        errors = {}
        for key in selected:
            state = self.keys.get(key)  # idle keys without errors are forgotten meanwhile
            error = state.take_error() if state is not None else None
            if error is not None:
                errors[key] = error
        return errors

    async def stop(self) -> None:
        """Finish every queued save, then end this actor (it is not restarted)."""
        await self.flush()
        self.io.shutdown(wait=True)
        ray.actor.exit_actor()

    async def stats(self) -> WriterStats:
        return WriterStats(
            saved=self.counts[SAVED],
            superseded=self.counts[SUPERSEDED],
            failed=self.counts[FAILED],
            abandoned=self.counts[ABANDONED],
            keys=len(self.keys),
            pending=sum(len(state.pending()) for state in self.keys.values()),
            awaiting_resend=self.lost.count(),
            bytes_written=self.bytes_written,
            bytes_linked=self.bytes_linked,
            pid=os.getpid(),
        )

    def _finish(self, save: QueuedSave, outcome: str) -> None:
        self.counts[outcome] += 1
        save.segment = None
        save.outcome.set_result(outcome)

    async def _drain(self, key: str, state: KeyQueue) -> None:
        loop = asyncio.get_running_loop()
        while state.queue:
            save = state.active = state.queue.popleft()
            outcome = FAILED
            try:
                data = await self.staged.get(save.payload, save.segment)
                persisted = await loop.run_in_executor(self.io, _persist, save, data, self.name, self.content_index)
                del data
                outcome = SUPERSEDED if persisted is None else SAVED
                if persisted is not None:
                    if persisted.linked:
                        self.bytes_linked += persisted.entry.bytes
                    else:
                        self.bytes_written += persisted.entry.bytes
                self.lost.superseded_on_disk(key, save.sequence)  # this save or a newer one is on disk
            except CallerDied as reason:  # nobody is left to hear of it
                log.error("fedckpt: dropped a save of %s: %s; the checkpoint on disk is unchanged", key, reason)
                outcome = ABANDONED
            except Exception as error:  # held for the caller: next call, flush or load
                log.error("fedckpt: saving %s failed: %s: %s", key, type(error).__name__, error)
                state.error = _transportable(error)
            finally:
                self.staged.finished(save.payload)
                state.active = None
                self._finish(save, outcome)
        state.draining = False
        # Forget idle keys without an error to report: a long run touches many keys.
        if state.error is None and self.keys.get(key) is state:
            del self.keys[key]


def _was_restarted() -> bool:
    """Whether Ray restarted this actor (False where that cannot be told, as outside Ray)."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


def writer_actor_class() -> Any:
    """The actor class, built on first use so that importing fedckpt does not touch Ray."""
    return ray.remote(
        num_cpus=0,  # never take a CPU slot that Flower's ClientApp pool needs
        max_restarts=-1,
        max_task_retries=-1,
    )(CheckpointWriter)
