"""The caller side of the runtime, one per process: the facade over the pool, the transport and the
saves in flight.

A save copies the snapshot once (:mod:`~fedckpt.runtime.transport`), records each of its saves
(:mod:`~fedckpt.runtime.inflight`), sends them (:mod:`~fedckpt.runtime.delivery`) and waits for
the acknowledgements of those that go by Ray calls: that is all it blocks for. It writes no files.
A snapshot on a GPU only has its copies queued; its saves are sent by the completion thread once the
copies completed (:mod:`~fedckpt.runtime.completion`), and so are the saves made behind it.
A flush waits for the writers (every process's saves issued before it) and then for this process's
own records, each one durable or failed.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

import ray

from fedckpt.errors import CheckpointError, SaveLostError
from fedckpt.runtime import failpoints, overlap_hooks, preemption, ray_session, stats, tickets
from fedckpt.runtime.background_start import BackgroundStart
from fedckpt.runtime.channel import ChannelClosed
from fedckpt.runtime.completion import Completions
from fedckpt.runtime.delivery import Delivery, WriterGone
from fedckpt.runtime.exit import flush_at_exit
from fedckpt.runtime.inflight import InflightSaves, SaveRecord, SaveState
from fedckpt.runtime.messages import SaveRequest, WriterStats
from fedckpt.runtime.pool import WriterPool
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.transport import Route, Transport
from fedckpt.runtime.watcher import Watcher
from fedckpt.snapshot import Snapshot

log = logging.getLogger("fedckpt")

# Small staging segments kept free ahead from the warm-up on: a Flower client's model save and state save.
STAGING_SEGMENTS_AHEAD = 2

# The completion thread's sends wait this long for a Ray answer; past it the watcher sends them again.
COMPLETION_SEND_SECONDS = 5.0


class Coordinator:
    """Routes saves to the writer pool and tracks what this process has in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.validated()
        self.started_ray = False
        self._pool: WriterPool | None = None
        self._transport = Transport(
            settings.shared_memory_staging,
            settings.max_inflight_bytes,
            lambda notices: self._delivery.on_notices(notices),
            settings.max_registered_bytes,
        )
        self._inflight = InflightSaves(lambda batch: self._transport.release(batch.staged))
        self._watcher = Watcher(
            self._transport.open_channels,
            lambda index, client, deadline: self._delivery.writer_died(index, client, deadline),
            lambda deadline: self._delivery.resend_lost(None, deadline),
        )
        self._delivery = Delivery(lambda: self._pool, self._transport, self._inflight, self._watcher.wake)
        self._completions = Completions(self._send_after_copy, self._copy_or_send_failed)
        self._background_start = BackgroundStart(self.start_writers, self._save_now, settings.max_inflight_bytes)
        self._save_lock = threading.RLock()  # one save at a time: staging memory, backpressure
        self._pool_lock = threading.RLock()
        stats.recorder.pending = self._inflight.pending

    # ---- the pool -------------------------------------------------------------------------

    def pool(self, create: bool = True) -> WriterPool | None:
        """The writer pool; created (or joined) on first use. With ``create=False``, None if there is none."""
        pool = self._current_pool()
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._pool is not None and self._pool.stopped is not None:
                self._leave_stopped_pool(self._pool)
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
                    self._exit_hooks()  # again after any ray.init: it runs before Ray's own exit hook
            return self._pool

    def _current_pool(self) -> WriterPool | None:
        """The pool joined, if it is still the one to use: not stopped, and of the Ray instance there is now."""
        pool = self._pool
        current = pool is not None and pool.stopped is None and pool.generation == ray_session.generation
        return pool if current and ray.is_initialized() else None

    def writers(self, create: bool = True) -> list[Any] | None:
        """The writer actors' handles (None without a pool and ``create=False``)."""
        pool = self.pool(create)
        return None if pool is None else pool.handles

    def start_writers(self) -> None:
        """Create (or find) the writer pool now rather than at the first save."""
        self.pool()

    def warm_up(self) -> None:
        """Join the pool, connect to the homes on this node, make staging segments ready and start this
        node's writers if a home runs elsewhere: what this process's first saves would wait for."""
        pool = self.pool()
        assert pool is not None
        routes = {index: self._transport.route(pool, index) for index in range(pool.size)}
        for index, route in routes.items():
            if route is Route.CHANNEL:
                self._transport.connect(pool, index)
        if self._transport.arena is not None:
            self._transport.arena.keep_ready(STAGING_SEGMENTS_AHEAD)
            if Route.RAY in routes.values():
                pool.ensure_node_writers(self._transport.node())
        self._watcher.wake()  # it watches the new channels

    def _leave_stopped_pool(self, pool: WriterPool) -> None:
        """The pool's writers ended for good (someone stopped it, or its job ended): what they had
        not written by then never will be, so those saves FAILED (the next flush names them); the
        next call joins or starts the pool there is now, as a later save anywhere does."""
        self._transport.take_in_notices()  # what the writers wrote before they ended
        for record in self._inflight.unfinished():
            self._inflight.failed(
                record,
                SaveLostError(
                    f"the writer pool {pool.namespace!r} was stopped ({type(pool.stopped).__name__}: fedckpt."
                    "shutdown() or stop_writers() in some process, or the end of its job) before this save "
                    "was written: the checkpoint keeps its last written version"
                ),
            )
        self._pool = None
        self._watcher.stop(wait=0.0)
        self._transport.close_channels()

    def _lost_ray_instance(self) -> None:
        """Ray was shut down (or replaced) under us: report saves that did not reach the disk."""
        from fedckpt.storage.base import storage_for

        lost = []
        self._completions.clear()
        for batch in self._inflight.clear():
            for record in batch.records:
                request = record.request
                entry = storage_for(request.key, request.storage_options).read_entry(request.key)
                if entry is None or request.sequence is None or tuple(entry.sequence) < tuple(request.sequence):
                    lost.append(request.key)
            self._transport.release(batch.staged)
        self._pool = None
        # It watched the lost instance, and may be in a Ray call: it must be out of it before the
        # ray.init that may follow (a Ray call racing ray.init crashes the process). Its calls time out.
        self._watcher.stop()
        self._transport.close_channels()
        if lost:
            raise CheckpointError(
                "Ray was shut down before these checkpoints were written (call fedckpt.flush() "
                f"before ray.shutdown()): {sorted(set(lost))}"
            )

    # ---- saving -----------------------------------------------------------------------------

    def save(self, requests: list[SaveRequest], snapshot: Snapshot, overlap: bool | None = None) -> None:
        """Save one snapshot under each request's key. Blocks for the copy and for sending the
        message (writers on this node) or for the acknowledgements (Ray calls); for a snapshot on a GPU
        only until its copies are queued (``overlap``: None, the process default; see
        :mod:`fedckpt.runtime.overlap_hooks`). Before the pool is up, only for a copy: the pool
        starts in the background (:mod:`fedckpt.runtime.background_start`)."""
        if not requests:
            return
        with stats.recorder.timed("blocked_seconds"):
            failed = self._background_start.take_failures({request.key for request in requests})
            if failed:
                raise CheckpointError.naming("An earlier save failed, so this save was not started", failed)
            if not self._connected():  # the save will be held: hooks first, so that the background
                self._exit_hooks()  # start's ray.init finds (and keeps) fedckpt's SIGTERM handler
            if self._background_start.hold(requests, snapshot, self._connected):
                return
            self._background_start.wait()  # held saves go first
            self._save_now(requests, snapshot, overlap)

    def _connected(self) -> bool:
        """Whether this process is in Ray or has had a pool: its saves are then made at once. Only a
        process that would have to start Ray (a plain program's first save) holds them instead; a Ray
        worker's save is with a writer when it returns, whatever becomes of the worker then."""
        return self._pool is not None or ray.is_initialized()

    def _exit_hooks(self) -> None:
        """What a process with saves in flight needs at exit (also before its pool is up): the
        flush at exit, and the flush on SIGTERM."""
        preemption.install(self.settings.preemption_grace_seconds)
        atexit.unregister(flush_at_exit)
        atexit.register(flush_at_exit, self)

    def _save_now(self, requests: list[SaveRequest], snapshot: Snapshot, overlap: bool | None = None) -> None:
        """:meth:`save` on the pool there is (started now if need be)."""
        with self._save_lock:
            pool = self.pool()
            assert pool is not None
            try:
                self._take_in()  # frees staging memory, and brings news of failed saves
            except WriterGone:
                if pool.stopped is None:
                    raise
                pool = self.pool()  # its channel showed the pool stopped: this save goes to the pool there is now
                assert pool is not None
            held = self._inflight.take_errors({request.key for request in requests})
            if held:
                raise CheckpointError.naming("An earlier save failed, so this save was not started", held)
            self._make_room(snapshot.nbytes)
            homes = [pool.owner_of(request.key) for request in requests]
            room = tickets.room_for(snapshot.packed_layout, requests) if self._transport.arena is not None else 0
            overlap = self.overlap_for(overlap)
            if overlap:
                overlap_hooks.install()  # the optimizer step pre-hook, once per process
            staged = self._transport.stage(snapshot, room, overlap)
            batch = self._inflight.add(staged, snapshot.nbytes, list(zip(requests, homes, strict=True)))
            stats.recorder.add(saves=len(requests), snapshots=1)
            if staged.copy is not None or self._completions.busy:  # in order, behind earlier GPU saves
                self._completions.submit(staged.copy, batch.records)
            else:
                self._delivery.send(batch.records)

    def overlap_for(self, option: bool | None) -> bool:
        """A checkpointer's ``overlap`` option, or this process's default (``fedckpt.init(overlap=...)``)."""
        return self.settings.overlap if option is None else option

    def _send_after_copy(self, records: list[SaveRecord]) -> None:
        """The completion thread: a save's copy completed; send it (the watcher sends again what times out)."""
        self._delivery.send(records, time.monotonic() + COMPLETION_SEND_SECONDS)

    def _copy_or_send_failed(self, records: list[SaveRecord], error: BaseException) -> None:
        """The completion thread: a save's copy (or its sending) failed. What was never sent cannot be: it
        FAILED, and the next save of its key, or a flush, raises. What went and came back is sent again."""
        log.error("fedckpt: a GPU save could not be staged or sent: %s: %s", type(error).__name__, error)
        failure = CheckpointError(f"The snapshot could not be staged or sent: {type(error).__name__}: {error}")
        failure.__cause__ = error
        for record in records:
            if record.state is SaveState.STAGED and record.sends == 0:
                self._inflight.failed(record, failure)

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until every save this process made so far has left its GPU and was sent to its writer
        (then other processes' loads and flushes see it). ``TimeoutError`` after ``timeout`` seconds."""
        if not self._completions.wait_delivered(timeout):
            raise TimeoutError(f"fedckpt.wait_staged: GPU saves still being copied after {timeout} s")

    def _take_in(self) -> None:
        """The notices that arrived on the channels; a channel found closed is its writer's death."""
        for index, client in self._transport.take_in_notices():
            self._delivery.writer_died(index, client)
        self._delivery.resend_lost()

    def _make_room(self, nbytes: int) -> None:
        """Backpressure: wait for older saves until this snapshot fits in the in-flight budget."""
        while self._inflight.nbytes + nbytes > self.settings.max_inflight_bytes:
            oldest = self._inflight.oldest()
            if oldest is None:
                return
            self._settle(oldest.records, None)

    def _settle(self, records: list[SaveRecord], deadline: float | None) -> None:
        """Block until each of ``records`` is durable or failed: send the lost ones again, read the
        channels the others' notices come on, wait for the Ray ones' callbacks. ``TimeoutError``
        once ``deadline`` (``time.monotonic``) passed."""
        while True:
            pending = [record for record in records if not record.finished]
            if not pending:
                return
            seen = self._inflight.transitions
            lost = [record for record in pending if record.lost]
            if lost:
                self._delivery.send(lost, deadline)
                continue
            on_channel = next((record for record in pending if record.channel is not None), None)
            if on_channel is not None:
                failpoints.reach("settle.reading", records=pending)
                self._read_notice(on_channel, deadline)
                continue
            # Saves answered by Ray callbacks, or being sent by another thread: a transition comes.
            failpoints.reach("settle.waiting", records=pending)
            if not self._inflight.wait_until(partial(self._inflight_changed_since, seen), deadline):
                raise TimeoutError(f"{len(pending)} saves not durable in time: {sorted({r.key for r in pending})}")

    def _inflight_changed_since(self, transitions: int) -> bool:
        return self._inflight.transitions != transitions

    def _read_notice(self, record: SaveRecord, deadline: float | None) -> None:
        """Read the channel ``record`` went on until its notice (or its writer's death) came."""
        client, writer = record.channel, record.writer
        try:
            client.read_until(lambda: record.channel is not client, deadline)
        except ChannelClosed:
            self._delivery.writer_died(writer, client, deadline)

    def stop_watcher(self, wait: float | None = None) -> None:
        """Stop the watcher thread (before Ray disconnects); the next pool starts a new one."""
        if wait is None:
            self._watcher.stop()
        else:
            self._watcher.stop(wait)

    # ---- waiting --------------------------------------------------------------------------

    def inflight_bytes(self) -> int:
        if self._pool is not None:
            self._take_in()
        return self._inflight.nbytes

    def wait_readable(self, *keys: str) -> None:
        """Block until every save of ``keys`` issued before now (from any process) is on disk."""
        if not self._readable_now(keys):
            self.flush(keys)

    def _readable_now(self, keys: tuple[str, ...]) -> bool:
        """Whether :meth:`wait_readable` has nothing to wait for or report, known without a flush (a
        Flower client's restore, a round after its save): this process's saves of ``keys`` are all
        durable (after taking in the notices that arrived), and the counters of their homes on this
        node show every save of them numbered so far written, with no error held."""
        pool = self._current_pool()
        if pool is None or self._background_start.busy or self._completions.busy:
            return False
        try:
            self._take_in()
        except WriterGone:
            return False
        if not self._inflight.settled(set(keys)):
            return False
        return all(self._transport.written(pool, index, group) for index, group in pool.keys_by_home(keys).items())

    def flush(self, keys: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Wait until saves issued before now are on storage: of ``keys``, or every one, by any
        process. ``CheckpointError`` names those that failed; ``TimeoutError`` after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        selected = None if keys is None else set(keys)
        if not self._background_start.wait(timeout):
            raise TimeoutError(f"fedckpt.flush: the writer pool was still starting after {timeout} s")
        start_failures = self._background_start.take_failures(selected)
        pool = self.pool(create=False)
        if pool is None:
            if start_failures:
                raise CheckpointError.naming("Saving failed", start_failures)
            return
        tracked = self._inflight.unfinished(selected)
        try:
            with stats.recorder.timed("waited_seconds"):
                errors = self._flush_current(pool, selected, tracked, deadline)
        except TimeoutError as error:  # Ray's GetTimeoutError is one too
            pending = sorted({record.key for record in tracked if not record.finished})
            message = f"fedckpt.flush: not done within {timeout} s ({error}); pending here: {pending}"
            raise TimeoutError(message) from None
        except ray.exceptions.RayError as error:  # Ray going down
            lost = sorted({record.key for record in tracked if not record.finished})
            raise CheckpointError(
                f"Waiting for saves failed ({type(error).__name__}: {error}); saves acknowledged but not "
                f"on storage: {lost or 'none known to this process'}"
            ) from error
        errors = {**start_failures, **errors}
        if errors:
            raise CheckpointError.naming("Saving failed", errors)

    def _flush_current(
        self, pool: WriterPool, selected: set[str] | None, tracked: list[SaveRecord], deadline: float | None
    ) -> dict[str, BaseException]:
        """:meth:`_flush` on the pool there is now: a pool found stopped on the way is left (what its
        writers had not written FAILED, and is reported here) and the current one flushed instead."""
        errors: dict[str, BaseException] = {}
        while True:
            try:
                errors.update(self._flush(pool, selected, tracked, deadline))
            except WriterGone:
                if pool.stopped is None:
                    raise
            else:
                if pool.stopped is None:
                    return errors
            current = self.pool(create=False)
            if current is None:
                return {**errors, **self._inflight.take_errors(selected)}
            pool = current

    def _flush(
        self, pool: WriterPool, selected: set[str] | None, tracked: list[SaveRecord], deadline: float | None
    ) -> dict[str, BaseException]:
        self._take_in()
        self._delivery.resend_lost(None, deadline)  # a writer must hold a save to wait for it
        groups: dict[int, list[str] | None] = (
            dict.fromkeys(range(pool.size)) if selected is None else dict(pool.keys_by_home(selected))
        )
        errors: dict[str, BaseException] = {}
        for index, group in groups.items():  # every process's saves issued before now
            try:
                errors.update(self._wait_for_writer(pool, index, group, deadline))
            except WriterGone as gone:  # what it held is lost: this process's saves among it FAILED
                errors.update(dict.fromkeys(group or [f"(every checkpoint of writer {index})"], gone))
        self._settle(tracked, deadline)  # and each of this process's own: durable, or failed
        own = self._inflight.take_errors(selected)
        self._inflight.mark_reported(errors)  # one failure, raised once
        if own:  # they name the saves; a lost writer's general error adds nothing then
            errors = {key: error for key, error in errors.items() if not isinstance(error, WriterGone)}
        return {**errors, **own}

    def _wait_for_writer(
        self, pool: WriterPool, index: int, keys: list[str] | None, deadline: float | None
    ) -> dict[str, BaseException]:
        """Writer ``index``'s answer to a flush of ``keys``, once it has every save sent before it."""
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                return self._transport.wait(pool, index, keys, left)
            except ChannelClosed:
                self._delivery.writer_died(index, self._transport.current_channel(index), deadline)
            except ray.exceptions.RayActorError as error:
                pool.stopped = error
                self._delivery.writer_died(index, None, deadline)
                raise WriterGone(f"writer {index} of the pool is gone for good: {error}") from error

    def writer_stats(self) -> list[WriterStats]:
        """Each writer's counters; empty without a pool."""
        pool = self.pool(create=False)
        return [] if pool is None else pool.stats()

    def stop_writers(self) -> None:
        """Stop the writer pool after its queued saves are written (a later save starts a new one)."""
        self._background_start.wait()
        pool = self.pool(create=False)
        if pool is not None:
            self.stop_watcher()  # a closing channel is not a writer to recover
            pool.stop()
        self.forget()

    def forget(self) -> None:
        """Drop the pool and everything in flight (after a flush, or after Ray was shut down on purpose)."""
        self._background_start.wait()
        self.stop_watcher()
        with self._pool_lock:
            atexit.unregister(flush_at_exit)
            self._pool = None
            self._completions.clear()
            for batch in self._inflight.clear():
                self._transport.release(batch.staged)
            self._transport.close()

    def release_staging_at_exit(self) -> None:
        """Close the staging memory unless saves still need it (their writers read it)."""
        if self._inflight.nbytes == 0 or not ray.is_initialized():
            self._transport.close()

    @property
    def pool_starting(self) -> bool:
        """Saves are held for a pool being started in the background, or they failed unreported."""
        return self._background_start.busy

    @property
    def ray_started_in_background(self) -> bool:
        return self._background_start.ray_started_here

    @property
    def has_pool(self) -> bool:
        """A pool is joined, or being started in the background with saves held for it (or held
        saves failed and no flush has reported them yet)."""
        return self._pool is not None or self._background_start.busy
