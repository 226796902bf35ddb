"""How each save reaches its writer, and reaches it again after that writer died.

A save is sent by the route its home allows (:mod:`~fedckpt.runtime.transport`): posted on the
node-local channel with a sequence from the home's counter, or enqueued with a Ray call that the
home answers with the sequence. Either way the save's ticket is written into its segment first
(:mod:`~fedckpt.runtime.tickets`), and its record (:mod:`~fedckpt.runtime.inflight`) knows the
channel or the incarnation it went to, so that a writer's death sends back to STAGED exactly the
saves that writer held. Those are sent again with their sequences; a writer takes a save sent twice
once (by its id).

Answers: channel notices are read by whichever call of this process reads the channel next; a Ray
save's ``wait_saved`` call resolves a callback. Nothing polls: a watcher thread
(:mod:`~fedckpt.runtime.watcher`) wakes when a channel hangs up or a save comes back to STAGED.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import ray

from fedckpt.errors import CheckpointError, SaveLostError
from fedckpt.runtime import failpoints, stats, tickets
from fedckpt.runtime.channel import ChannelClient, ChannelClosed
from fedckpt.runtime.inflight import Batch, InflightSaves, SaveRecord, SaveState
from fedckpt.runtime.messages import Enqueue, SaveDone, SharedMemoryPayload
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.transport import Route, Transport

log = logging.getLogger("fedckpt")


class WriterGone(CheckpointError):
    """A writer of the pool that Ray will not restart (killed for good): what it held is lost."""


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Delivery:
    """Sends this process's saves, takes in the writers' answers, and recovers from a writer's death."""

    def __init__(
        self,
        pool: Callable[[], WriterPool | None],
        transport: Transport,
        inflight: InflightSaves,
        wake: Callable[[], None],
    ) -> None:
        self._pool = pool  # the current pool (None once it went away)
        self._transport = transport
        self._inflight = inflight
        self._wake = wake  # the watcher: saves came back to STAGED
        self._recovering: dict[int, threading.Lock] = defaultdict(threading.Lock)
        self._ticket_lock = threading.Lock()

    # ---- sending ---------------------------------------------------------------------------------

    def send(self, records: list[SaveRecord], deadline: float | None = None) -> None:
        """Send the STAGED saves of ``records`` (new, or lost with their writer) to their homes; a
        writer found dead meanwhile is recovered and sent its saves again. Returns once each is
        with a writer (or finished); a Ray call's answer is waited for until ``deadline``."""
        while True:
            pool = self._pool()
            if pool is None:
                raise CheckpointError("The writer pool went away while saves were in flight")
            claimed = self._inflight.claim(records)
            if not claimed:
                return
            try:
                died = self._send_claimed(pool, claimed, deadline)
            except BaseException:  # a Ray call out of time, an interrupt: what did not go is sent later
                self._inflight.lost([record for record in claimed if record.state is SaveState.SENT])
                self._wake()
                raise
            for index, client in died:
                self.writer_died(index, client, deadline)
            records = [record for record in claimed if record.state is SaveState.STAGED]

    def resend_lost(self, writer: int | None = None, deadline: float | None = None) -> None:
        """Send again every save a dead writer took with it (of ``writer``, or of any)."""
        lost = self._inflight.lost_records(writer)
        if lost:
            failpoints.reach("delivery.resending", records=lost)
            stats.recorder.add(resends=len(lost))
            self.send(lost, deadline)

    def _send_claimed(
        self, pool: WriterPool, claimed: list[SaveRecord], deadline: float | None
    ) -> list[tuple[int, ChannelClient | None]]:
        """Send claimed (SENT) saves, batch by batch; returns the writers found dead on the way
        (with the channel that said so), whose saves went back to STAGED."""
        died: list[tuple[int, ChannelClient | None]] = []
        by_batch: dict[Batch, dict[int, list[SaveRecord]]] = defaultdict(lambda: defaultdict(list))
        for record in claimed:
            by_batch[record.batch][record.writer].append(record)
        for batch, by_writer in by_batch.items():
            posts: list[tuple[int, ChannelClient, list[SaveRecord]]] = []
            calls: list[tuple[int, list[SaveRecord]]] = []
            for index, group in by_writer.items():
                if self._transport.route(pool, index, batch.staged) is Route.CHANNEL:
                    try:
                        client = self._transport.channel(pool, index)
                        numbers = self._transport.numbers(pool, index, [record.request.key for record in group])
                    except (ChannelClosed, OSError):  # it died (its channel and counter went with it)
                        self._inflight.lost(group)
                        died.append((index, None))
                        continue
                    # Every save takes a number; one sent again keeps the sequence it had.
                    sent = [
                        replace(record.request, sequence=record.request.sequence or number)
                        for record, number in zip(group, numbers, strict=True)
                    ]
                    self._inflight.sent_on(group, sent, client, client.epoch)
                    posts.append((index, client, group))
                else:
                    self._inflight.sent_on(group, [r.request for r in group], None, pool.infos[index].epoch)
                    calls.append((index, group))
            self._write_ticket(pool, batch)  # before anything goes: a writer restarted later finds it
            for index, client, group in posts:
                try:
                    client.post(Enqueue([record.request for record in group], batch.staged.payload))
                except ChannelClosed:
                    self._inflight.lost(group)
                    died.append((index, client))
                    continue
                failpoints.reach("delivery.posted", index=index, client=client, records=group)
                for record in group:
                    self._inflight.acknowledged(record)
            for index, group in calls:
                self._enqueue_by_ray(pool, index, group, batch, deadline)
            if calls:
                self._write_ticket(pool, batch)  # with the sequences the homes gave
        return died

    def _enqueue_by_ray(
        self, pool: WriterPool, index: int, group: list[SaveRecord], batch: Batch, deadline: float | None
    ) -> None:
        try:
            requests = [record.request for record in group]
            acks = self._transport.enqueue_by_ray(pool, index, requests, batch.staged, _left(deadline))
        except ray.exceptions.GetTimeoutError:
            self._inflight.lost(group)  # sent again later: the writer takes it once, by its id
            raise
        except ray.exceptions.RayActorError as error:  # Ray gave up on the writer
            for record in group:
                self._inflight.failed(record, self._gone_for_good(index, error))
            return
        for record, ack in zip(group, acks, strict=True):
            request = replace(record.request, sequence=tuple(ack.sequence))
            done_ref = self._transport.wait_saved_by_ray(pool, index, request, ack)
            self._inflight.acknowledged(record, ack.sequence, done_ref, ack.writer_epoch)
            done_ref.future().add_done_callback(partial(self._ray_answered, record, done_ref))

    def _write_ticket(self, pool: WriterPool, batch: Batch) -> None:
        payload = batch.staged.payload
        if not isinstance(payload, SharedMemoryPayload):
            return
        homes: dict[int, list[Any]] = defaultdict(list)
        for record in batch.records:
            if not record.finished:
                homes[record.writer].append(record.request)
        with self._ticket_lock:  # two threads sending saves of one batch would tear it
            self._transport.write_ticket(batch.staged, tickets.Ticket(pool.namespace, dict(homes), payload))

    # ---- answers -----------------------------------------------------------------------------------

    def on_notices(self, notices: list[SaveDone]) -> None:
        """Notices read from a channel (by whichever thread read it)."""
        lost = False
        for notice in notices:
            record = self._inflight.finished(notice)
            lost = lost or (record is not None and record.lost)
        if lost:
            self._wake()

    def _ray_answered(self, record: SaveRecord, done_ref: Any, future: Any) -> None:
        """A Ray save's ``wait_saved`` resolved (on a thread of Ray's): take in its outcome."""
        if record.done_ref is not done_ref:  # sent again since: that send answers
            return
        try:
            notice = future.result()
        except ray.exceptions.RayActorError as error:  # gone for good: Ray retries the call on a restart
            self._inflight.failed(record, self._gone_for_good(record.writer, error))
            return
        except Exception as error:  # Ray going down, the call cancelled: sent again by the next call
            log.debug("fedckpt: waiting for a save of %s failed: %s", record.key, error)
            self._inflight.lost([record])
        else:
            self._inflight.finished(notice)
        if record.lost:
            self._wake()

    @staticmethod
    def _gone_for_good(index: int, error: BaseException) -> SaveLostError:
        return SaveLostError(
            f"writer {index} is gone for good ({type(error).__name__}), with this save acknowledged and not "
            "written: the checkpoint keeps its last written version"
        )

    # ---- a writer that died -------------------------------------------------------------------

    def writer_died(self, index: int, client: ChannelClient | None = None, deadline: float | None = None) -> None:
        """Writer ``index`` died (``client``, its channel, hung up; or it could not be reached): its
        saves go back to STAGED, and once Ray restarted it they are sent again. Once per writer at a
        time; whoever comes second finds the channel dropped and the writer looked up already.

        :class:`WriterGone` if Ray will not restart it: its saves in flight FAILED."""
        with self._recovering[index]:
            pool = self._pool()
            if pool is None or not ray.is_initialized():
                return  # Ray went down under this process: the next call reports what was lost
            dead_epoch = client.epoch if client is not None else pool.infos[index].epoch
            if client is not None:
                with contextlib.suppress(ChannelClosed):
                    client.pump()  # notices it sent before it died
                failpoints.reach("writer_died.before_drop", index=index, client=client)
                self._transport.drop_channel(index, client)
                self._inflight.lost_on(client)
            if pool.infos[index].epoch == dead_epoch:  # nobody looked it up since it died
                try:
                    info = pool.refresh(index, _left(deadline))  # returns once Ray restarted it
                except ray.exceptions.RayActorError as error:
                    pool.stopped = error
                    for record in self._inflight.unfinished():
                        if record.writer == index:
                            self._inflight.failed(record, self._gone_for_good(index, error))
                    raise WriterGone(f"writer {index} of the pool is gone for good: {error}") from error
                if info.epoch == dead_epoch and client is None:  # alive, but its channel cannot be reached
                    log.warning("fedckpt: writer %d's channel cannot be reached; using Ray calls", index)
                    pool.infos[index] = replace(info, channel_address=None)
                self._inflight.lost_with(index, dead_epoch)
                if self._inflight.lost_records(index):
                    log.warning("fedckpt: writer %d restarted (pid %d); sending its saves again", index, info.pid)
        self.resend_lost(index, deadline)
