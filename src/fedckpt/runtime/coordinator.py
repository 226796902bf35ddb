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
import contextlib
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import ray

from fedckpt.errors import CheckpointError
from fedckpt.runtime import preemption, ray_session
from fedckpt.runtime.channel import ChannelClosed
from fedckpt.runtime.inflight import Batch, InflightSave, InflightSaves, SaveState
from fedckpt.runtime.messages import ABANDONED, UNKNOWN, SaveDone, SaveRequest, WriterStats
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.staging import remove_orphans
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
        self._transport = Transport(settings.shared_memory_staging, settings.max_inflight_bytes, self._on_done)
        self._inflight = InflightSaves()
        self._save_lock = threading.RLock()  # one save at a time: staging memory, per-key order
        self._pool_lock = threading.RLock()
        self._recovering: dict[int, threading.Lock] = defaultdict(threading.Lock)
        self._resending = threading.Lock()
        # Errors of saves sent again in the background, for the next call on their key or flush.
        self._held_errors: dict[str, BaseException] = {}
        self._watcher = Watcher(
            self._transport.open_channels,
            self._inflight.on_ray,
            self._recover,
            lambda saves: self._check_ray_saves(saves, timeout=0.0),
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
                    atexit.unregister(self._flush_at_exit)
                    atexit.register(self._flush_at_exit)
            return self._pool

    def writers(self, create: bool = True) -> list[Any] | None:
        """The writer actors' handles (None without a pool and ``create=False``)."""
        pool = self.pool(create)
        return None if pool is None else pool.handles

    def start_writers(self) -> None:
        """Create (or find) the writer pool now rather than at the first save."""
        self.pool()

    def _lost_ray_instance(self) -> None:
        """Ray was shut down (or replaced) under us: report saves that did not reach the disk."""
        from fedckpt.storage.manifest import read_entry

        lost = []
        for batch in self._inflight.clear():
            for save in batch.saves:
                entry = read_entry(save.request.key)
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
            self._take_in_notices()  # frees staging memory, and brings news of failed saves
            held = self._take_held_errors({request.key for request in requests})
            if held:
                raise CheckpointError.naming("An earlier save failed, so this save was not started", held)
            self._make_room(snapshot.nbytes)
            groups: dict[int, list[SaveRequest]] = defaultdict(list)
            for request in requests:
                groups[pool.owner_of(request.key)].append(request)
            local = all(self._transport.route(pool, index) is Route.CHANNEL for index in groups)
            staged = self._transport.stage(snapshot, shared_memory=local)
            self._inflight.add(staged, self._enqueue(pool, staged, groups))

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
                    self._recover(index)
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
            self._resend_and_recover()
            sent = [save for save in batch.saves if save.state is SaveState.SENT]
            if not sent:
                continue
            first = sent[0]
            if first.route is Route.CHANNEL:
                try:
                    self._transport.channel(pool, first.writer).pump(0.5)
                except ChannelClosed:
                    self._recover(first.writer)
            else:
                self._check_ray_saves(sent, timeout=RAY_POLL_SECONDS)

    # ---- notices, losses and re-sends -----------------------------------------------------------

    def _on_done(self, writer: int, notices: list[SaveDone]) -> None:
        for notice in notices:
            self._finished(writer, notice)

    def _finished(self, writer: int, notice: SaveDone) -> None:
        """A save left its writer; a failure is held for this process's next call on its key."""
        save, released = self._inflight.done(writer, notice.sequence)
        for staged in released:
            self._transport.release(staged)
        if save is not None and notice.error is not None:
            self._held_errors[save.request.key] = notice.error

    def _take_in_notices(self) -> None:
        """Done notices that arrived (channels), and Ray saves that finished (without waiting)."""
        self._transport.take_in_notices()
        on_ray = self._inflight.on_ray()
        if on_ray:
            self._check_ray_saves(on_ray, timeout=0.0)

    def _check_ray_saves(self, saves: list[InflightSave], timeout: float) -> None:
        """Take in the outcomes of Ray-route saves that resolved; lost ones are sent again."""
        refs = [save.done_ref for save in saves]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if not ready and timeout > 0:
            ready, _ = ray.wait(refs, num_returns=1, timeout=0)
        resolved = set(ready)
        for save in saves:
            if save.done_ref not in resolved:
                continue
            try:
                notice = ray.get(save.done_ref)
            except ray.exceptions.RayError as error:  # the writer is gone for good, or Ray is going down
                log.debug("fedckpt: waiting for a save of %s failed: %s", save.request.key, error)
                self._inflight.lost_one(save)
                continue
            if notice.outcome in (UNKNOWN, ABANDONED):
                self._inflight.lost_one(save)
            else:
                self._finished(save.writer, notice)
        if any(save.state is SaveState.LOST for save in saves):
            self._resend_and_recover()

    def _recover(self, writer: int) -> None:
        """Writer ``writer``'s channel closed: it died. Wait until Ray restarted it, then send it
        what it held of this process's saves again."""
        with self._recovering[writer]:
            pool = self._pool
            if pool is None or not ray.is_initialized():
                # Ray went down under this process (any Ray call would start a new instance): the
                # next call reports what was lost.
                return
            client = self._transport.open_channels().get(writer)
            if client is not None:
                with contextlib.suppress(ChannelClosed, TimeoutError):
                    client.pump(0.0)  # notices it sent before it died
                if not client.closed:
                    return  # recovered by another thread meanwhile
            self._transport.drop_channel(writer)
            self._inflight.writer_lost(writer, Route.CHANNEL)
            info = pool.refresh(writer)
        if self._inflight.lost(writer):
            log.warning("fedckpt: writer %d restarted (pid %d); sending its lost saves again", writer, info.pid)
        self._resend_and_recover(writer)

    def _resend_and_recover(self, writer: int | None = None) -> None:
        for closed in self._resend_lost(writer):
            self._recover(closed)

    def _resend_lost(self, writer: int | None = None) -> set[int]:
        """Send the lost saves (of ``writer``, or all) again, with their sequences. Returns the
        writers whose channel closed meanwhile (to recover, outside this lock)."""
        pool = self._pool
        closed: set[int] = set()
        if pool is None:
            return closed
        with self._resending:
            for batch, save in self._inflight.lost(writer):
                if save.writer in closed:
                    continue
                answer = self._transport.enqueue(pool, batch.staged, {save.writer: [save.request]})[save.writer]
                if isinstance(answer, ChannelClosed):
                    closed.add(save.writer)
                else:
                    self._inflight.resent(save, save.writer, answer[0])
        return closed

    def _take_held_errors(self, keys: set[str] | None) -> dict[str, BaseException]:
        """Errors of background re-sends for ``keys`` (or all), cleared: each is reported once."""
        chosen = [key for key in list(self._held_errors) if keys is None or key in keys]
        return {key: self._held_errors.pop(key) for key in chosen if key in self._held_errors}

    def stop_watcher(self, wait: float = 2.0) -> None:
        """Stop the watcher thread (before Ray disconnects); the next pool starts a new one."""
        self._watcher.stop(wait)

    # ---- waiting --------------------------------------------------------------------------

    def inflight_bytes(self) -> int:
        self._take_in_notices()
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
            self._flush(pool, selected, deadline)
        except ray.exceptions.RayError as error:  # a writer gone for good, or Ray going down
            lost = sorted({save.request.key for _, save in self._inflight.lost()})
            raise CheckpointError(
                f"Waiting for saves failed ({type(error).__name__}: {error}); saves acknowledged but not "
                f"on storage: {lost or 'none known to this process'}"
            ) from error

    def _flush(self, pool: WriterPool, selected: list[str] | None, deadline: _Deadline) -> None:
        self._resend_and_recover()  # a writer must hold a save to wait for it
        if selected is None:
            groups: dict[int, list[str] | None] = dict.fromkeys(range(pool.size))
        else:
            groups = defaultdict(list)
            for key in selected:
                groups[pool.owner_of(key)].append(key)  # type: ignore[union-attr]
        errors = self._take_held_errors(None if selected is None else set(selected))
        for index, group in groups.items():
            while True:
                try:
                    errors.update(self._transport.wait(pool, index, group, deadline.left()))
                    break
                except ChannelClosed:
                    self._recover(index)
        errors.update(self._take_held_errors(None if selected is None else set(selected)))
        self._take_in_notices()
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
            atexit.unregister(self._flush_at_exit)
            self._held_errors.clear()
            self._pool = None
            for batch in self._inflight.clear():
                self._transport.release(batch.staged)
            self._transport.close()

    def _flush_at_exit(self) -> None:
        """A process that exits normally loses nothing it saved, and leaves no staging memory behind.

        If saves failed, the process exits with status 1 once the error is printed: an exception in
        an exit handler would leave the status 0, as if everything had been saved.
        """
        failed = False
        try:
            # After SIGTERM the handler flushed for its grace period already: SIGKILL is near.
            if self._pool is not None and ray.is_initialized() and not preemption.sigterm_handled.is_set():
                try:
                    self.flush()
                except Exception as error:
                    log.error("fedckpt: saves failed before exit: %s", error)
                    failed = True
        finally:
            self.stop_watcher()  # before Ray's own exit hook disconnects this process
            if self._inflight.nbytes == 0 or not ray.is_initialized():
                self._transport.close()
            if not ray.is_initialized():
                # Ray was shut down under this process (Flower does, after a simulation): its workers
                # were killed without cleaning up, so remove their staging segments now.
                remove_orphans(settle_seconds=1.0, grace_seconds=0.0)
        if failed:
            _exit_with_failure()


def _exit_with_failure() -> None:
    """Exit now with status 1. The exit handlers registered before fedckpt's would not run after
    ``os._exit``; the ones that matter here run first: Ray's shutdown, then logging's and stdio's flush."""
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray_session.unwrapped_shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)
