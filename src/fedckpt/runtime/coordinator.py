"""The caller side of the runtime, one per process: the facade over the pool, the transport and the
saves in flight.

A save copies the snapshot once (:mod:`~fedckpt.runtime.transport`), sends one message per writer
involved and waits for their acknowledgements: that is all it blocks for. It writes no files. A
background thread, the watcher, notices when a writer dies (its channel closes, or a Ray call says
so) and sends what that writer lost again at once, because a flush in any other process (a
server's round commit) waits for those saves, and this process may stay idle for a long time.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import ray

from fedckpt.errors import CheckpointError
from fedckpt.runtime import preemption, ray_session, stats
from fedckpt.runtime.channel import ChannelClosed
from fedckpt.runtime.exit import flush_at_exit
from fedckpt.runtime.inflight import Batch, InflightSaves, SaveState
from fedckpt.runtime.messages import SaveRequest, WriterStats
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.resend import Resender
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.transport import Enqueued, Route, Staged, Transport
from fedckpt.runtime.watcher import RAY_POLL_SECONDS, Watcher
from fedckpt.snapshot import Snapshot

log = logging.getLogger("fedckpt")


class _Deadline:
    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())


class Coordinator:
    """Routes saves to the writer pool and tracks what this process has in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.validated()
        self.started_ray = False
        self._pool: WriterPool | None = None
        self._transport = Transport(
            settings.shared_memory_staging,
            settings.max_inflight_bytes,
            lambda writer, notices: self._resender.on_done(writer, notices),
        )
        self._inflight = InflightSaves()
        self._resender = Resender(lambda: self._pool, self._transport, self._inflight)
        self._save_lock = threading.RLock()  # one save at a time: staging memory, per-key order
        self._pool_lock = threading.RLock()
        self._watcher = Watcher(
            self._transport.open_channels,
            self._inflight.on_ray,
            self._resender.recover,
            lambda saves: self._resender.check_ray_saves(saves, timeout=0.0),
        )

    # ---- the pool -------------------------------------------------------------------------

    def pool(self, create: bool = True) -> WriterPool | None:
        """The writer pool; created (or joined) on first use. With ``create=False``, None if there is none."""
        pool = self._pool
        if pool is not None and pool.generation == ray_session.generation and ray.is_initialized():
            return pool
        with self._pool_lock:
            if self._pool is not None:
                if ray.is_initialized() and ray_session.session_id() == self._pool.session:
                    self._pool.generation = ray_session.generation
                else:
                    self._lost_ray_instance()
            if self._pool is None:
                if not create and not ray.is_initialized():
                    return None
                if create:
                    self.started_ray = ray_session.ensure_ray() or self.started_ray
                self._pool = WriterPool.create(self.settings) if create else WriterPool.find(self.settings)
                if self._pool is not None:
                    self._watcher.start()
                    preemption.install(self.settings.preemption_grace_seconds)
                    # Re-registered after any ray.init so that it runs before Ray's own exit hook.
                    atexit.unregister(flush_at_exit)
                    atexit.register(flush_at_exit, self)
            return self._pool

    def writers(self, create: bool = True) -> list[Any] | None:
        """The writer actors' handles (None without a pool and ``create=False``)."""
        pool = self.pool(create)
        return None if pool is None else pool.handles

    def start_writers(self) -> None:
        """Create (or find) the writer pool now rather than at the first save."""
        self.pool()

    def warm_up(self) -> None:
        """Join the pool, connect to the homes on this node and start this node's writers if a home
        runs elsewhere: what this process's first saves would wait for."""
        pool = self.pool()
        assert pool is not None
        routes = {index: self._transport.route(pool, index) for index in range(pool.size)}
        for index, route in routes.items():
            if route is Route.CHANNEL:
                self._transport.connect(pool, index)
        if self._transport.arena is not None and Route.RAY in routes.values():
            pool.ensure_node_writers(self._transport.node())

    def _lost_ray_instance(self) -> None:
        """Ray was shut down (or replaced) under us: report saves that did not reach the disk."""
        from fedckpt.storage.base import storage_for

        lost = []
        for batch in self._inflight.clear():
            for save in batch.saves:
                key = save.request.key
                entry = storage_for(key, save.request.storage_options).read_entry(key)
                if entry is None or tuple(entry.sequence) < tuple(save.request.sequence):
                    lost.append(save.request.key)
            self._transport.release(batch.staged)
        self._pool = None
        self._watcher.stop(wait=0.0)  # it watched the lost instance; a new pool starts a new one
        self._transport.close_channels()
        if lost:
            raise CheckpointError(
                "Ray was shut down before these checkpoints were written (call fedckpt.flush() "
                f"before ray.shutdown()): {sorted(set(lost))}"
            )

    # ---- saving -----------------------------------------------------------------------------

    def save(self, requests: list[SaveRequest], snapshot: Snapshot) -> None:
        """Save one snapshot under each request's key. Blocks for the copy and for sending the
        message (writers on this node) or for the acknowledgements (Ray calls)."""
        if not requests:
            return
        with self._save_lock:
            pool = self.pool()
            assert pool is not None
            self._resender.take_in_notices()  # frees staging memory, and brings news of failed saves
            held = self._resender.take_held_errors({request.key for request in requests})
            if held:
                raise CheckpointError.naming("An earlier save failed, so this save was not started", held)
            self._make_room(snapshot.nbytes)
            groups: dict[int, list[SaveRequest]] = defaultdict(list)
            for request in requests:
                groups[pool.owner_of(request.key)].append(request)
            staged = self._transport.stage(snapshot, shared_memory=self._transport.arena is not None)
            sent = self._enqueue(pool, staged, groups)
            batch = self._inflight.add(staged, sent)
            stats.recorder.add(saves=len(requests), snapshots=1)
            self._resend_if_their_channel_closed(batch, sent)

    def _resend_if_their_channel_closed(self, batch: Batch, sent: list[tuple[SaveRequest, int, Enqueued]]) -> None:
        """A writer that died between a save's post and this process tracking the save was recovered
        (by the watcher) without it: such a save is lost, and sent again now."""
        orphaned = set()
        for save, (_, writer, enqueued) in zip(batch.saves, sent, strict=True):
            if enqueued.channel is not None and enqueued.channel.closed:
                self._inflight.lost_one(save)
                orphaned.add(writer)
        for writer in orphaned:
            self._resender.recover(writer)  # unless the watcher did already
            self._resender.resend_and_recover(writer)

    def _enqueue(
        self, pool: WriterPool, staged: Staged, groups: dict[int, list[SaveRequest]]
    ) -> list[tuple[SaveRequest, int, Enqueued]]:
        """Send the requests; a writer whose channel closed is recovered and sent them again."""
        sent = []
        while groups:
            answers = self._transport.enqueue(pool, staged, groups)
            retry = {}
            for index, answer in answers.items():
                if isinstance(answer, ChannelClosed):
                    self._resender.recover(index)
                    retry[index] = groups[index]
                else:
                    sent.extend((enqueued.request, index, enqueued) for enqueued in answer)
            groups = retry
        return sent

    def _make_room(self, nbytes: int) -> None:
        """Backpressure: wait for older saves until this snapshot fits in the in-flight budget."""
        while self._inflight.nbytes + nbytes > self.settings.max_inflight_bytes:
            oldest = self._inflight.oldest()
            if oldest is None:
                return
            self._wait_for(oldest)

    def _wait_for(self, batch: Batch) -> None:
        """Block until every save of ``batch`` left its writer, sending lost ones again."""
        while not batch.finished():
            pool = self._pool
            if pool is None:
                raise CheckpointError("The writer pool went away while saves were in flight")
            self._resender.resend_and_recover()
            sent = [save for save in batch.saves if save.state is SaveState.SENT]
            if not sent:
                continue
            first = sent[0]
            if first.route is Route.CHANNEL:
                try:
                    self._transport.channel(pool, first.writer).pump(0.5)
                except ChannelClosed:
                    self._resender.recover(first.writer)
            else:
                self._resender.check_ray_saves(sent, timeout=RAY_POLL_SECONDS)

    def stop_watcher(self, wait: float = 2.0) -> None:
        """Stop the watcher thread (before Ray disconnects); the next pool starts a new one."""
        self._watcher.stop(wait)

    # ---- waiting --------------------------------------------------------------------------

    def inflight_bytes(self) -> int:
        self._resender.take_in_notices()
        return self._inflight.nbytes

    def wait_readable(self, *keys: str) -> None:
        """Block until every save of ``keys`` issued before now (from any process) is on disk."""
        self.flush(keys)

    def flush(self, keys: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Wait until saves issued before now are on disk: of ``keys``, or of every process."""
        pool = self.pool(create=False)
        if pool is None:
            return
        deadline = _Deadline(timeout)
        selected = None if keys is None else sorted(set(keys))
        try:
            with stats.recorder.timed("waited_seconds"):
                self._flush(pool, selected, deadline)
        except ray.exceptions.RayError as error:  # a writer gone for good, or Ray going down
            lost = sorted({save.request.key for _, save in self._inflight.lost()})
            raise CheckpointError(
                f"Waiting for saves failed ({type(error).__name__}: {error}); saves acknowledged but not "
                f"on storage: {lost or 'none known to this process'}"
            ) from error

    def _flush(self, pool: WriterPool, selected: list[str] | None, deadline: _Deadline) -> None:
        self._resender.resend_and_recover()  # a writer must hold a save to wait for it
        if selected is None:
            groups: dict[int, list[str] | None] = dict.fromkeys(range(pool.size))
        else:
            groups = defaultdict(list)
            for key in selected:
                groups[pool.owner_of(key)].append(key)  # type: ignore[union-attr]
        errors = self._resender.take_held_errors(None if selected is None else set(selected))
        for index, group in groups.items():
            while True:
                try:
                    errors.update(self._transport.wait(pool, index, group, deadline.left()))
                    break
                except ChannelClosed:
                    self._resender.recover(index)
        # The writers' failure notices came before their answers: take them in first, so that one
        # failure is reported by this flush, not again by the next call on its key.
        self._resender.take_in_notices()
        errors.update(self._resender.take_held_errors(None if selected is None else set(selected)))
        if errors:
            raise CheckpointError.naming("Saving failed", errors)

    def writer_stats(self) -> list[WriterStats]:
        """Each writer's counters; empty without a pool."""
        pool = self.pool(create=False)
        return [] if pool is None else pool.stats()

    def stop_writers(self) -> None:
        """Stop the writer pool after its queued saves are written (a later save starts a new one)."""
        pool = self.pool(create=False)
        if pool is not None:
            self.stop_watcher()  # a closing channel is not a writer to recover
            pool.stop()
        self.forget()

    def forget(self) -> None:
        """Drop the pool and everything in flight (after a flush, or after Ray was shut down on purpose)."""
        self.stop_watcher()
        with self._pool_lock:
            atexit.unregister(flush_at_exit)
            self._resender.held_errors.clear()
            self._pool = None
            for batch in self._inflight.clear():
                self._transport.release(batch.staged)
            self._transport.close()

    def release_staging_at_exit(self) -> None:
        """Close the staging memory unless saves still need it (their writers read it)."""
        if self._inflight.nbytes == 0 or not ray.is_initialized():
            self._transport.close()

    @property
    def has_pool(self) -> bool:
        return self._pool is not None
