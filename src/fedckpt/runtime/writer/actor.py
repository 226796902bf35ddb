"""The writer actor: per-key ordered, coalescing, background persistence of snapshots.

Each checkpoint key is owned by one writer of a pool. For a key, saves are written one at a time in
sequence order, and a queued save is dropped once a newer one arrives (latest wins). File I/O runs
on a small thread pool, so the actor keeps answering while it writes.

Callers on the writer's node talk to it over the node-local channel: one message per save call,
carrying the sequences the caller took from this writer's counter, and a ``SaveDone`` notice back
per save; nothing waits for the writer in between. Callers on other nodes use Ray calls
(``enqueue``, ``wait_saved``). Both reach the same queues. A flush or wait first takes in what the
channel already holds, so a save whose call returned anywhere on the node is seen. What a restart
loses, and how it is recovered, is in ``recovery.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import ray

import fedckpt.runtime.writer.incarnation as incarnation
from fedckpt.runtime import channel, failpoints, tickets
from fedckpt.runtime.messages import (
    Ack,
    Enqueue,
    Outcome,
    Payload,
    PoolShape,
    Reply,
    SaveDone,
    SaveRequest,
    SharedMemoryPayload,
    WaitCall,
    WriterInfo,
    WriterStats,
)
from fedckpt.runtime.sequence import bucket_of
from fedckpt.runtime.staging import PREFIX, SHM_DIR, shared_memory_available
from fedckpt.runtime.writer.io import SaveIO, transportable
from fedckpt.runtime.writer.metrics import WriterMetrics
from fedckpt.runtime.writer.node_writer import NodeWriters
from fedckpt.runtime.writer.process import fedckpt_version, run_as_background_work, shared_counter, wait_for_job_end
from fedckpt.runtime.writer.queue import KeyQueue, KeyQueues, QueuedSave
from fedckpt.runtime.writer.recovery import LostSaves

log = logging.getLogger("fedckpt.writer")


# Outcomes of saves that left this writer, kept by save id: a save sent twice (its caller thought
# this writer dead) or a ``wait_saved`` that comes late is answered from here.
RECENT_OUTCOMES = 65536


class CheckpointWriter:
    """Ray actor body; see :func:`writer_actor_class` for the options it runs with."""

    def __init__(self, index: int, shape: PoolShape) -> None:
        run_as_background_work()
        self.shape = shape
        self.version = fedckpt_version()
        self._watching_job: asyncio.Task | None = None
        self.index = index
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.incarnation = incarnation.begin(self.actor_id, self.node_id)
        self.epoch = self.incarnation.epoch  # sequences of a restarted writer sort after the old ones
        self.number = 0  # without a shared counter
        local = channel.channel_supported() and shared_memory_available()
        self.counter = shared_counter() if local else None
        local = self.counter is not None  # else callers on this node use Ray calls
        self.arrived = 0  # saves that took a number from this incarnation's counter and reached it
        self.arrived_in: dict[int, int] = {}  # the same, per bucket of keys (fedckpt.runtime.sequence)
        self.waits_answered = 0
        self.keys = KeyQueues()
        self.saves_by_id: dict[str, QueuedSave] = {}  # queued or being written
        self.recent: OrderedDict[str, SaveDone] = OrderedDict()
        self.metrics = WriterMetrics(shape.namespace, str(index))
        self.name = f"writer-{index}@{os.getpid()}"
        self.io = SaveIO(shape.io_threads, self.name)
        self.node_writers = NodeWriters(shape)
        self.lost = LostSaves(self.incarnation.restarted, self.name, self._hold_error)
        self.channel_address = channel.new_address(f"writer-{index}") if local else None
        self._channel_server: channel.ChannelServer | None = None
        self._recovery: asyncio.Task | None = None
        self._recovered = asyncio.Event()

    async def describe(self) -> WriterInfo:
        """Who this writer is; starts its channel first, so callers on its node can connect."""
        self._start_recovery()
        await self._serve_channel()
        if self.shape.job_id is not None and self._watching_job is None:
            self._watching_job = asyncio.get_running_loop().create_task(self._end_with_job())
        return WriterInfo(
            index=self.index,
            pool_size=self.shape.pool_size,
            writers_per_node=self.shape.writers_per_node,
            coalesce=self.shape.coalesce,
            io_threads=self.shape.io_threads,
            epoch=self.epoch,
            restarted=self.lost.restarted,
            pid=os.getpid(),
            node_id=self.node_id,
            channel_address=self.channel_address,
            counter_path=None if self.counter is None else self.counter.path,
            version=self.version,
            job_id=self.shape.job_id,
        )

    # ---- a restart ------------------------------------------------------------------------------

    def _start_recovery(self) -> None:
        """Once, at this incarnation's first call: a restarted writer queues what its predecessor was
        sent and not known finished, from the tickets in this node's segments (now) and in the
        segments of the nodes whose writers it asks (a task that flushes wait for)."""
        if self._recovery is not None:
            return
        if self.lost.restarted and self.counter is not None:
            for found in tickets.scan(SHM_DIR, PREFIX, self.shape.namespace, self.index, self.node_id):
                self._enqueue(found.request, found.payload, None)
        self._recovery = asyncio.get_running_loop().create_task(self._recover_elsewhere())

    async def _recover_elsewhere(self) -> None:
        try:
            if self.lost.restarted:
                staged_elsewhere = await self.node_writers.scan(self.index, self.incarnation.previous_node)
                for found in staged_elsewhere:
                    self._enqueue(found.request, found.payload, None)
                if staged_elsewhere:
                    log.warning("fedckpt: %s: %d saves its predecessor held, staged on other nodes, queued again",
                                self.name, len(staged_elsewhere))  # fmt: skip
        except Exception as error:  # their callers send them again; a flush waits for what it knows
            log.warning("fedckpt: %s could not ask the node writers for its predecessor's saves: %s", self.name, error)
        finally:
            self._recovered.set()
            self._open_bucket_marks()
            self._mark_if_quiet()

    async def _ready(self) -> None:
        """Before answering a flush or a wait: the predecessor's saves are queued."""
        self._start_recovery()
        await self._recovered.wait()

    # ---- the channel ----------------------------------------------------------------------------

    async def _end_with_job(self) -> None:
        """A job's own pool goes away with the job: once Ray reports the job ended, write what is
        queued, then end this actor for good (it is detached, so nothing else would)."""
        job_id = self.shape.job_id  # the job whose end ends this pool (None: a named pool)
        assert job_id is not None
        await wait_for_job_end(job_id)
        log.info("fedckpt: %s: job %s ended; writing what is queued, then stopping", self.name, job_id)
        await self._write_everything_and_end()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def _serve_channel(self) -> None:
        if self._channel_server is not None or self.channel_address is None:
            return
        try:
            self._channel_server = channel.ChannelServer(self.channel_address, self._on_channel_message)
        except OSError as error:  # callers fall back to Ray calls
            log.warning("fedckpt: %s cannot serve its node-local channel: %s", self.name, error)
            self.channel_address = None

    def _on_channel_message(self, message: Any, connection: channel.ServerConnection) -> Any:
        if isinstance(message, Enqueue):
            for request in message.requests:
                self._arrived(request.key)  # each took a number from the counter
                self._enqueue(request, message.payload, connection)
            return None
        if isinstance(message, WaitCall):
            return self._answer_wait(message, connection)
        raise TypeError(f"unexpected message on the channel: {type(message).__name__}")

    async def _answer_wait(self, message: WaitCall, connection: channel.ServerConnection) -> None:
        self.waits_answered += 1
        connection.send(Reply(message.call_id, await self.flush(message.keys)))

    # ---- saves ----------------------------------------------------------------------------------

    async def enqueue(self, request: SaveRequest, payload: Payload) -> Ack:
        """Queue a save and acknowledge at once (Ray calls: callers on other nodes)."""
        number = self._take_number(request.key)  # every arrival takes one, so the quiet marks stay exact
        if request.sequence is None:
            request = replace(request, sequence=(self.epoch, number))
        return self._enqueue(request, payload, None)

    def _take_number(self, key: str) -> int:
        """A number of this incarnation's counter for a save of ``key``, taken by the writer itself (an arrival)."""
        self._arrived(key)
        if self.counter is not None:
            return self.counter.take([key])
        self.number += 1
        return self.number

    def _arrived(self, key: str) -> None:
        """A save numbered from this incarnation's counter reached it."""
        self.arrived += 1
        bucket = bucket_of(key)
        self.arrived_in[bucket] = self.arrived_in.get(bucket, 0) + 1

    def _enqueue(self, request: SaveRequest, payload: Payload, notify: channel.ServerConnection | None) -> Ack:
        """Queue a save; ``notify`` hears when it left memory. A save already queued or finished
        here (sent twice) is taken once. The write happens in the background. A failure of an
        earlier save of the key stays held for the next flush or wait; it does not stop this save."""
        known = self._known(request.save_id, notify)
        if known is not None:
            return known
        if request.sequence is None:  # from a ticket whose Ray enqueue had not been answered
            request = replace(request, sequence=(self.epoch, self._take_number(request.key)))
        sequence: tuple[int, int] = tuple(request.sequence)  # type: ignore[assignment,arg-type]
        if sequence[0] != self.epoch:  # numbered by an earlier incarnation, which lost it
            self.metrics.resent()
        state = self.keys.setdefault(request.key, KeyQueue())
        save = QueuedSave(request, sequence, payload, asyncio.get_running_loop().create_future())
        if notify is not None:
            save.listeners.append(notify)
        if save.save_id is not None:
            self.saves_by_id[save.save_id] = save
        self.metrics.arrived()
        awaited = self.lost.arrived(request.key, sequence)  # nobody waits for its arrival any longer
        if awaited is not None:  # from now on, waiting for the save itself covers it
            save.outcome.add_done_callback(lambda _: awaited.done() or awaited.set_result(None))
        try:
            if self._stages_here(payload):
                self.io.map_segment(save)
        except OSError as error:  # its caller's segment is gone: nothing of it can be written
            self._finish(save, Outcome.FAILED, transportable(error))
            return Ack(sequence, self.epoch)
        for dropped in state.add(save, self.shape.coalesce):
            self._finish(dropped, Outcome.SUPERSEDED)
        if not state.draining:
            state.draining = True
            asyncio.get_running_loop().create_task(self._drain(request.key, state))
        return Ack(sequence, self.epoch)

    def _known(self, save_id: str | None, notify: channel.ServerConnection | None) -> Ack | None:
        """The acknowledgement of a save this incarnation has already (``notify`` hears of it too)."""
        if save_id is None:
            return None
        queued = self.saves_by_id.get(save_id)
        if queued is not None:
            if notify is not None:
                queued.listeners.append(notify)
            return Ack(queued.sequence, self.epoch)
        done = self.recent.get(save_id)
        if done is not None:
            if notify is not None:
                notify.send(done)
            return Ack(done.sequence, self.epoch)
        return None

    def _stages_here(self, payload: Payload) -> bool:
        """Whether the save's bytes are on this node (else its node's writer writes them)."""
        return not isinstance(payload, SharedMemoryPayload) or payload.node_id == self.node_id

    def _hold_error(self, key: str, error: BaseException) -> None:
        """Report ``error`` to the next flush or wait of ``key`` (from any process)."""
        self.keys.setdefault(key, KeyQueue()).error = error
        self._unmark(key)  # no number was taken for it: its bucket's mark would still say quiet

    async def wait_saved(self, save_id: str, key: str, sequence: tuple[int, int], writer_epoch: int) -> SaveDone:
        """Wait until one save left memory: saved, superseded, failed or abandoned.

        ``Outcome.UNKNOWN`` when this incarnation does not have it (an earlier one took it and died
        with it): its caller sends it again, and until then flushes wait for it.
        """
        await self._ready()
        queued = self.saves_by_id.get(save_id)
        if queued is not None:
            return await asyncio.shield(queued.outcome)
        done = self.recent.get(save_id)
        if done is not None:
            return done
        sequence = tuple(sequence)  # type: ignore[assignment]
        if writer_epoch != self.epoch:
            self.lost.expect(key, sequence)
            self._unmark(key)  # a wait for the key waits for the save to be sent again
        return SaveDone(sequence, Outcome.UNKNOWN, save_id=save_id)

    async def wait_key(self, key: str) -> BaseException | None:
        """Wait for every save of ``key`` issued before this call; return (and clear) its error."""
        return (await self.flush([key])).get(key)

    async def flush(self, keys: list[str] | None = None) -> dict[str, BaseException]:
        """Wait for every save (of ``keys``, or all) issued before this call, by any process, also
        those an earlier incarnation lost; return and clear their errors."""
        await self._ready()
        if self._channel_server is not None:
            self._channel_server.drain()  # saves whose calls returned on this node are in the sockets
        selected = list(self.keys.keys() | self.lost.keys()) if keys is None else keys
        outcomes = [save.outcome for key in selected if key in self.keys for save in self.keys[key].pending()]
        await asyncio.gather(*outcomes, *self.lost.futures(selected))
        errors = {}
        for key in selected:
            state = self.keys.get(key)  # idle keys without errors are forgotten meanwhile
            error = state.take_error() if state is not None else None
            if error is not None:
                errors[key] = error
                if not state.pending():
                    del self.keys[key]
                    self._mark_bucket_if_quiet(key)
        self._mark_if_quiet()
        return errors

    def _mark_if_quiet(self) -> None:
        """Set the counter's quiet mark if nothing is pending, held or awaited (see fedckpt.runtime.sequence)."""
        if self.counter is not None and self._recovered.is_set() and not self.keys and self.lost.count() == 0:
            self.counter.mark_quiet(self.arrived)

    def _mark_bucket_if_quiet(self, key: str) -> None:
        """``key`` left the queues: mark its bucket quiet if no key of it is queued, held or awaited."""
        bucket = bucket_of(key)
        if self.counter is None or not self._recovered.is_set() or bucket in self.keys.per_bucket:
            return
        awaited = self.lost.keys()  # saves of an earlier incarnation, to be sent again
        if any(bucket_of(key) == bucket for key in awaited):
            return
        self.counter.mark_bucket_quiet(bucket, self.arrived_in.get(bucket, 0))

    def _unmark(self, key: str) -> None:
        if self.counter is not None:
            self.counter.unmark_bucket(bucket_of(key))

    def _open_bucket_marks(self) -> None:
        """Recovered: the buckets of what the predecessor left (queued again, or awaited) stay unmarked
        until it is done; every other bucket is quiet while nothing of it is numbered."""
        if self.counter is None:
            return
        for key in set(self.keys) | self.lost.keys():
            self._unmark(key)
        self.counter.mark_ready()

    async def stop(self) -> None:
        """Finish every queued save, then end this actor (it is not restarted)."""
        await self._write_everything_and_end()
        ray.actor.exit_actor()

    async def _write_everything_and_end(self) -> None:
        """Write what is queued; the next writer of this name is a new one, not a restart."""
        await self.flush()
        self.io.shutdown()
        if self._channel_server is not None:
            self._channel_server.close()
        if self.counter is not None:  # callers that still map it see a writer that is gone
            self.counter.close(remove=True)
        incarnation.end(self.actor_id)

    async def stats(self) -> WriterStats:
        return WriterStats(
            saved=self.metrics.counts[Outcome.SAVED],
            superseded=self.metrics.counts[Outcome.SUPERSEDED],
            failed=self.metrics.counts[Outcome.FAILED],
            abandoned=self.metrics.counts[Outcome.ABANDONED],
            keys=len(self.keys),
            pending=sum(len(state.pending()) for state in self.keys.values()),
            awaiting_resend=self.lost.count(),
            bytes_written=self.metrics.bytes_written,
            bytes_linked=self.metrics.bytes_linked,
            resends=self.metrics.resends,
            node_id=self.node_id,
            pid=os.getpid(),
            waits_answered=self.waits_answered,
        )

    def _finish(self, save: QueuedSave, outcome: Outcome, error: BaseException | None = None) -> None:
        """The save left memory: its notices go out (before any quiet mark), then its waiters hear."""
        self.metrics.finished(outcome, time.monotonic() - save.arrived)
        save.segment = None
        if error is not None:
            self.keys.setdefault(save.request.key, KeyQueue()).error = error
        done = SaveDone(save.sequence, outcome, error, save.save_id)
        if save.save_id is not None:
            self.saves_by_id.pop(save.save_id, None)
            self.recent[save.save_id] = done
            while len(self.recent) > RECENT_OUTCOMES:
                self.recent.popitem(last=False)
        for listener in save.listeners:
            listener.send(done)
        save.outcome.set_result(done)

    async def _drain(self, key: str, state: KeyQueue) -> None:
        """Write the key's queued saves one at a time, in sequence order."""
        while state.queue:
            save = state.active = state.queue.popleft()
            sent_before = save.sequence[0] != self.epoch  # an earlier incarnation may have written it
            await failpoints.reach_async("writer.writing", key=key)
            numbering = save.request.version is not None and save.request.version.server_round is None
            unnumbered = await self.io.number_round(save) if numbering else None
            if unnumbered is not None:
                written = unnumbered
                if self._stages_here(save.payload):
                    self.io.staged.finished(save.payload)  # mapped on arrival, never to be read
            elif self._stages_here(save.payload):
                written = await self.io.write(save, look_first=sent_before)
                if written.persisted is not None:
                    self.metrics.persisted(written.persisted.entry.bytes, written.persisted.linked)
            else:
                written = await self.node_writers.write(save, look_first=sent_before)
            if save.request.version is not None and written.outcome in (Outcome.SAVED, Outcome.SUPERSEDED):
                written = await self.io.keep_round(save, written)
            if written.outcome in (Outcome.SAVED, Outcome.SUPERSEDED):
                self.lost.superseded_on_disk(key, save.sequence)  # this save or a newer one is on disk
            state.active = None
            self._finish(save, written.outcome, written.error)
        state.draining = False
        # Forget idle keys without an error to report: a long run touches many keys.
        if state.error is None and self.keys.get(key) is state:
            del self.keys[key]
            self._mark_bucket_if_quiet(key)
        self._mark_if_quiet()


def writer_actor_class() -> Any:
    """The actor class, built on first use so that importing fedckpt does not touch Ray."""
    return ray.remote(
        num_cpus=0,  # never take a CPU slot that Flower's ClientApp pool needs
        max_restarts=-1,
        max_task_retries=-1,
    )(CheckpointWriter)
