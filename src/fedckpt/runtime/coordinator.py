"""The caller side of the runtime: one per process.

It copies each snapshot once into staging memory (a reused shared-memory segment, or Ray's object
store for writers on other nodes), sends it to the writer that owns each key, waits only for the
enqueue acknowledgement, keeps in-flight bytes under the budget, re-sends saves whose writer
restarted before writing them, and turns writer errors into CheckpointError. It writes no files.

Re-sending does not wait for this process's next call: a background thread watches the saves in
flight and re-sends the lost ones at once, because a flush in any other process (a server's round
commit) waits for them, and this process may stay idle for a long time.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray

from fedckpt.errors import CheckpointError
from fedckpt.runtime import ray_session
from fedckpt.runtime.messages import ABANDONED, OBJECT_STORE, SHARED_MEMORY, UNKNOWN, SaveRequest
from fedckpt.runtime.settings import Settings
from fedckpt.runtime.staging import Segment, StagingArena, remove_orphans, shared_memory_available
from fedckpt.runtime.writer import writer_actor_class
from fedckpt.snapshot import Snapshot

log = logging.getLogger("fedckpt")

# How long the background re-sender blocks in one ``ray.wait`` before it looks for newer saves (and
# how long it may take to notice it was told to stop).
RESEND_POLL_SECONDS = 0.5


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def writer_name(index: int) -> str:
    return f"fedckpt-writer-{index}"


def shard_of(key: str, pool_size: int) -> int:
    """The writer index that owns ``key``: stable across processes and runs."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % pool_size


@dataclass
class _Save:
    request: SaveRequest  # with the sequence it was acknowledged with
    done: ray.ObjectRef  # resolves when the save left the writer's memory
    payload: dict[str, Any]  # how it was sent: the batch's payload, or its portable copy
    settled: bool = False  # the re-sender saw ``done`` resolve to an outcome that needs no re-send


@dataclass
class _Batch:
    """One staged snapshot and the saves (one per key) that use it."""

    payload: dict[str, Any]  # {"layout": ..., "data": where the staged bytes are}
    nbytes: int
    segment: Segment | None  # the staging segment to reuse once every save left its writer
    saves: list[_Save] = field(default_factory=list)
    portable: dict[str, Any] | None = None  # the same bytes in Ray's object store, made on demand

    def key_set(self) -> set[str]:
        return {save.request.key for save in self.saves}


class _Deadline:
    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())


class Coordinator:
    """Routes saves to writer actors and tracks what this process has in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.validated()
        self.started_ray = False
        self._writers: list[Any] | None = None
        self._writer_nodes: list[str] = []
        self._session: str | None = None
        use_shared_memory = self.settings.shared_memory_staging and shared_memory_available()
        self._arena = StagingArena(self.settings.max_inflight_bytes) if use_shared_memory else None
        self._batches: deque[_Batch] = deque()
        self._inflight_bytes = 0
        self._lock = threading.RLock()
        # Errors the background re-sender was answered with, for the next call on their key or flush.
        self._held_errors: dict[str, BaseException] = {}
        self._resender: threading.Thread | None = None
        self._stop_resender = threading.Event()

    # ---- the pool -------------------------------------------------------------------------

    def writers(self, create: bool = True) -> list[Any] | None:
        """The writer pool; created on first use. With ``create=False``, None if there is none."""
        if self._writers is not None and not (ray.is_initialized() and ray_session.session_id() == self._session):
            self._lost_ray_instance()
        if self._writers is None:
            if not create and not ray.is_initialized():
                return None
            if create:
                self.started_ray = ray_session.ensure_ray() or self.started_ray
            self._writers = self._create_pool() if create else self._find_pool()
            self._session = ray_session.session_id() if self._writers is not None else None
            if self._writers is not None:
                self._start_resender()
                # Re-registered after any ray.init so that it runs before Ray's own exit hook.
                atexit.unregister(self._flush_at_exit)
                atexit.register(self._flush_at_exit)
        return self._writers

    def start_writers(self) -> None:
        """Create (or find) the writer pool now rather than at the first save."""
        with self._lock:
            self.writers()

    def _flush_at_exit(self) -> None:
        """A process that exits normally loses nothing it saved, and leaves no staging memory behind."""
        try:
            if self._writers is not None and ray.is_initialized():
                try:
                    self.flush()
                except Exception as error:
                    log.error("fedckpt: saves failed before exit: %s", error)
                    raise
        finally:
            self.stop_resender()  # before Ray's own exit hook disconnects this process
            if self._arena is not None and (not self._batches or not ray.is_initialized()):
                self._arena.close()
            if not ray.is_initialized():
                # Ray was shut down under this process (Flower does, after a simulation): its workers
                # were killed without cleaning up, so remove their staging segments now.
                remove_orphans(settle_seconds=1.0)

    def _actor_options(self, index: int) -> dict[str, Any]:
        return {
            "name": writer_name(index),
            "namespace": self.settings.namespace,
            "lifetime": "detached",  # not owned by whichever client process happened to create it
            "get_if_exists": True,
        }

    def _create_pool(self) -> list[Any]:
        actor = writer_actor_class()
        settings = self.settings
        first = actor.options(**self._actor_options(0)).remote(
            0, settings.num_writers, settings.coalesce, settings.io_threads
        )
        info = ray.get(first.describe.remote())  # the pool's size is whatever its creator chose
        if info["pool_size"] != settings.num_writers:
            log.info("fedckpt: joining an existing pool of %d writers", info["pool_size"])
        rest = [
            actor.options(**self._actor_options(index)).remote(
                index, info["pool_size"], info["coalesce"], info["io_threads"]
            )
            for index in range(1, info["pool_size"])
        ]
        writers = [first, *rest]
        self._writer_nodes = self._node_ids(writers)  # also waits until every writer has started
        return writers

    def _find_pool(self) -> list[Any] | None:
        try:
            first = ray.get_actor(writer_name(0), namespace=self.settings.namespace)
        except ValueError:
            return None
        size = ray.get(first.describe.remote())["pool_size"]
        writers = [first] + [
            ray.get_actor(writer_name(index), namespace=self.settings.namespace) for index in range(1, size)
        ]
        self._writer_nodes = self._node_ids(writers)
        return writers

    @staticmethod
    def _node_ids(writers: list[Any]) -> list[str]:
        return [info["node_id"] for info in ray.get([writer.describe.remote() for writer in writers])]

    def _writer_for(self, key: str) -> Any:
        writers = self.writers()
        assert writers is not None
        return writers[shard_of(key, len(writers))]

    def _lost_ray_instance(self) -> None:
        """Ray was shut down (or replaced) under us: report saves that did not reach the disk."""
        from fedckpt.storage.manifest import read_entry

        lost = []
        for batch in self._batches:
            for save in batch.saves:
                entry = read_entry(save.request.key)
                if entry is None or tuple(entry.sequence) < tuple(save.request.sequence):
                    lost.append(save.request.key)
            self._release(batch)
        self._batches.clear()
        self._inflight_bytes = 0
        self._writers = None
        self._session = None
        self._stop_resender.set()  # its refs belong to the lost instance; a new pool starts a new one
        if lost:
            raise CheckpointError(
                "Ray was shut down before these checkpoints were written (call fedckpt.flush() "
                f"before ray.shutdown()): {sorted(set(lost))}"
            )

    # ---- saving -----------------------------------------------------------------------------

    def save(self, requests: list[SaveRequest], snapshot: Snapshot) -> None:
        """Save one snapshot under each request's key. Blocks for the copy and the enqueue acks."""
        if not requests:
            return
        with self._lock:
            held = self._take_held_errors({request.key for request in requests})
            if held:
                raise _checkpoint_error("An earlier save failed, so this save was not started", held)
            writers = self.writers()
            self._make_room(snapshot.nbytes)
            shards = {shard_of(request.key, len(writers)) for request in requests}
            local = all(self._writer_nodes[shard] == _node_id() for shard in shards)
            if local and self._arena is not None:
                batch, errors = self._stage_in_shared_memory(snapshot, requests)
            else:
                batch = self._stage_in_object_store(snapshot)
                errors = self._acknowledge(batch, requests, self._send(batch, requests, staged=True))
            if batch.saves:
                self._batches.append(batch)
                self._inflight_bytes += batch.nbytes
            else:
                self._release(batch)
        if errors:
            raise _checkpoint_error("An earlier save failed, so this save was not started", errors)

    def _stage_in_shared_memory(
        self, snapshot: Snapshot, requests: list[SaveRequest]
    ) -> tuple[_Batch, dict[str, BaseException]]:
        """The blocking copy, into a reused segment that writers on this node read directly.

        The enqueues go out first, so their round trip overlaps the copy; the writers start
        writing only once told the copy is complete.
        """
        assert self._arena is not None
        segment = self._arena.acquire(snapshot.nbytes)
        token = uuid.uuid4().bytes
        data = (SHARED_MEMORY, segment.path, snapshot.nbytes, token, _node_id())
        batch = _Batch({"layout": snapshot.packed_layout, "data": data}, snapshot.nbytes, segment)
        pending = self._send(batch, requests, staged=False)
        snapshot.copy_into(segment.array)  # if this raised, the writers would time the saves out
        segment.mark_staged(token)  # tells the writers the copy is complete, should this process die
        return batch, self._acknowledge(batch, requests, pending)

    def _stage_in_object_store(self, snapshot: Snapshot) -> _Batch:
        """The blocking copy, into Ray's object store: for writers on other nodes."""
        array = np.empty(snapshot.nbytes, dtype=np.uint8)
        snapshot.copy_into(array)
        batch = _Batch(_object_store_payload(snapshot.packed_layout, array), snapshot.nbytes, None)
        batch.portable = batch.payload
        return batch

    def _portable_payload(self, batch: _Batch) -> dict[str, Any]:
        """The batch's bytes in Ray's object store, for a writer that moved to another node."""
        if batch.portable is None:
            assert batch.segment is not None
            array = np.array(batch.segment.array[: batch.nbytes])  # a copy: the segment gets reused
            batch.portable = _object_store_payload(batch.payload["layout"], array)
        return batch.portable

    def _follow_moved_writer(
        self, batch: _Batch, request: SaveRequest, writer: Any, ack: Any, payload: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """The ack and payload of a save, sent again through the object store if ``ack`` says that
        Ray restarted its writer on another node (which cannot read this node's shared memory)."""
        if ack.moved_to is None:
            return ack, payload
        self._writer_nodes[shard_of(request.key, len(self._writer_nodes))] = ack.moved_to
        portable = self._portable_payload(batch)
        return ray.get(writer.enqueue.remote(request, portable, True)), portable

    def _send(self, batch: _Batch, requests: list[SaveRequest], staged: bool) -> list[tuple[Any, Any]]:
        """Submit one enqueue per request; returns (writer, ack ref) pairs."""
        writers = [self._writer_for(request.key) for request in requests]
        return [
            (writer, writer.enqueue.remote(req, batch.payload, staged))
            for writer, req in zip(writers, requests, strict=True)
        ]

    def _acknowledge(
        self, batch: _Batch, requests: list[SaveRequest], pending: list[tuple[Any, Any]]
    ) -> dict[str, BaseException]:
        """Wait for the acks; for each accepted save, say its bytes are staged and ask (without
        waiting) to hear when it is written."""
        acks = ray.get([ack for _, ack in pending])
        errors = {}
        for (writer, _), request, ack in zip(pending, requests, acks, strict=True):
            ack, payload = self._follow_moved_writer(batch, request, writer, ack, batch.payload)
            if ack.error is not None:
                errors[request.key] = ack.error
                continue
            acknowledged = replace(request, sequence=ack.sequence)
            done = writer.wait_saved.remote(request.key, ack.sequence, ack.writer_epoch, True)
            batch.saves.append(_Save(acknowledged, done, payload))
        return errors

    def _release(self, batch: _Batch) -> None:
        if batch.segment is not None and self._arena is not None:
            self._arena.release(batch.segment)
            batch.segment = None

    def _make_room(self, nbytes: int) -> None:
        """Backpressure: wait for older saves until this snapshot fits in the in-flight budget."""
        self._release_finished()
        while self._batches and self._inflight_bytes + nbytes > self.settings.max_inflight_bytes:
            self._settle(self._batches[0], _Deadline(None))
            self._release_finished()

    def _release_finished(self) -> None:
        while self._batches:
            batch = self._batches[0]
            ready, _ = ray.wait([save.done for save in batch.saves], num_returns=len(batch.saves), timeout=0)
            if len(ready) < len(batch.saves):
                return
            self._settle(batch, _Deadline(None))
            self._batches.popleft()
            self._inflight_bytes -= batch.nbytes
            self._release(batch)

    def _settle(self, batch: _Batch, deadline: _Deadline) -> None:
        """Wait until every save of ``batch`` left its writer; re-send those a writer restart lost."""
        while True:
            outcomes = ray.get([save.done for save in batch.saves], timeout=deadline.left())
            lost = [
                save for save, outcome in zip(batch.saves, outcomes, strict=True) if outcome in (UNKNOWN, ABANDONED)
            ]
            if not lost:
                return
            for save in lost:
                error = self._resend(batch, save)
                if error is not None:
                    raise _checkpoint_error("Saving failed", {save.request.key: error})

    def _resend(self, batch: _Batch, save: _Save) -> BaseException | None:
        """Send a save again that a writer restart lost; returns the error the writer answered with.

        On an error the save stays lost (``done`` unchanged): the next settle sends it again.
        """
        log.warning("fedckpt: writer restarted before writing %s; sending it again", save.request.key)
        writer = self._writer_for(save.request.key)
        ack = ray.get(writer.enqueue.remote(save.request, save.payload, True))
        ack, save.payload = self._follow_moved_writer(batch, save.request, writer, ack, save.payload)
        if ack.error is not None:
            return ack.error
        save.done = writer.wait_saved.remote(save.request.key, ack.sequence, ack.writer_epoch)
        save.settled = False
        return None

    # ---- the background re-sender -------------------------------------------------------------

    def _start_resender(self) -> None:
        """Start the thread that re-sends lost saves, unless one runs already (called with the pool)."""
        if self._resender is not None and self._resender.is_alive() and not self._stop_resender.is_set():
            return
        self._stop_resender = threading.Event()  # a thread still stopping keeps its own, set, event
        self._resender = threading.Thread(
            target=self._resend_in_background, args=(self._stop_resender,), name="fedckpt-resender", daemon=True
        )
        self._resender.start()

    def stop_resender(self, wait: float = 2 * RESEND_POLL_SECONDS) -> None:
        """Stop the re-sender thread (before Ray disconnects); the next pool starts a new one."""
        self._stop_resender.set()
        thread = self._resender
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait)  # never called with self._lock held by this thread: the thread takes it

    def _resend_in_background(self, stop: threading.Event) -> None:
        """Re-send the saves a writer restart lost as soon as their ``wait_saved`` says so.

        A restarted writer answers the outstanding ``wait_saved`` of each save its predecessor held
        with UNKNOWN, and a flush anywhere waits until the save arrives again: without this thread
        it would arrive only at this process's next call. The lock is taken only to look at the
        batches and to re-send, never while blocking in ``ray.wait``; ``save()`` holds it during its
        copy, and then this thread simply waits its turn.
        """
        while not stop.is_set():
            with self._lock:
                watched = [
                    (batch, save, save.done) for batch in self._batches for save in batch.saves if not save.settled
                ]
            if not watched:
                stop.wait(RESEND_POLL_SECONDS)
                continue
            if not ray.is_initialized():
                # Ray went down under this process. Stop here: any ray.* call would start a new Ray
                # instance (auto-init). The next pool starts a new thread; the next call reports
                # what was lost (_lost_ray_instance).
                return
            refs = [ref for _, _, ref in watched]
            try:
                ready, _ = ray.wait(refs, num_returns=1, timeout=RESEND_POLL_SECONDS)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            except Exception as error:  # Ray shut down or replaced under this process
                if not stop.wait(RESEND_POLL_SECONDS):
                    log.debug("fedckpt: re-sender waiting: %s", error)
                continue
            resolved = set(ready)
            with self._lock:
                if stop.is_set():
                    return
                connected = self._writers is not None and ray.is_initialized()
                if connected and ray_session.session_id() == self._session:
                    for batch, save, ref in watched:
                        if ref in resolved and save.done is ref:  # else re-sent by a call meanwhile
                            self._check_in_background(batch, save)
                    continue
            # Ray went away under this process: the next call reports what was lost (_lost_ray_instance).
            stop.wait(RESEND_POLL_SECONDS)

    def _check_in_background(self, batch: _Batch, save: _Save) -> None:
        """Re-send one save if its writer lost it; errors are held for the next call on its key."""
        try:
            outcome = ray.get(save.done, timeout=RESEND_POLL_SECONDS)
        except Exception:  # the writer stopped, Ray went down...: the next settle raises it
            save.settled = True
            return
        if outcome not in (UNKNOWN, ABANDONED):
            save.settled = True
            return
        try:
            error = self._resend(batch, save)
        except Exception as failure:  # e.g. Ray going down: leave it to the next settle
            log.debug("fedckpt: re-sending %s in the background failed: %s", save.request.key, failure)
            save.settled = True
            return
        if error is not None:
            self._held_errors[save.request.key] = error
            save.settled = True  # not again in the background; the next settle re-sends it

    def _take_held_errors(self, keys: set[str] | None) -> dict[str, BaseException]:
        """Errors the re-sender got for ``keys`` (or all), cleared: each is reported once."""
        chosen = [key for key in self._held_errors if keys is None or key in keys]
        return {key: self._held_errors.pop(key) for key in chosen}

    # ---- waiting --------------------------------------------------------------------------

    def inflight_bytes(self) -> int:
        with self._lock:
            self._release_finished()
            return self._inflight_bytes

    def wait_readable(self, *keys: str) -> None:
        """Block until every save of ``keys`` issued before now (from any process) is on disk."""
        wanted = set(keys)
        with self._lock:
            writers = self.writers(create=False)
            if writers is None:
                return
            self._settle_batches(lambda batch: bool(batch.key_set() & wanted), _Deadline(None))
            errors = ray.get([writers[shard_of(key, len(writers))].wait_key.remote(key) for key in keys])
            failed = self._take_held_errors(wanted)
        failed.update({key: error for key, error in zip(keys, errors, strict=True) if error is not None})
        if failed:
            raise _checkpoint_error("Saving failed", failed)

    def flush(self, keys: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Wait until saves issued before now are on disk: of ``keys``, or of every process."""
        deadline = _Deadline(timeout)
        selected = None if keys is None else set(keys)
        with self._lock:
            writers = self.writers(create=False)
            if writers is None:
                return
            self._settle_batches(lambda batch: selected is None or bool(batch.key_set() & selected), deadline)
            if selected is None:
                calls = [writer.flush.remote(None) for writer in writers]
            else:
                by_writer: dict[int, list[str]] = {}
                for key in selected:
                    by_writer.setdefault(shard_of(key, len(writers)), []).append(key)
                calls = [writers[index].flush.remote(group) for index, group in by_writer.items()]
            results = ray.get(calls, timeout=deadline.left())
            errors = self._take_held_errors(selected)
            for result in results:
                errors.update(result)
            self._release_finished()
        if errors:
            raise _checkpoint_error("Saving failed", errors)

    def _settle_batches(self, wanted: Any, deadline: _Deadline) -> None:
        for batch in list(self._batches):
            if wanted(batch):
                self._settle(batch, deadline)

    def writer_stats(self) -> list[dict[str, int]]:
        """Each writer's counters (saved, superseded, failed, pending); empty without a pool."""
        writers = self.writers(create=False)
        return [] if writers is None else ray.get([writer.stats.remote() for writer in writers])

    def stop_writers(self) -> None:
        """Stop the writer pool after its queued saves are written (a later save starts a new one)."""
        with self._lock:
            writers = self.writers(create=False)
            if writers is None:
                return
            for writer in writers:
                with contextlib.suppress(ray.exceptions.RayActorError):  # exiting is how stop() answers
                    ray.get(writer.stop.options(max_task_retries=0).remote())
        self.forget()  # not under the lock: it waits for the re-sender thread, which takes it

    def forget(self) -> None:
        """Drop the pool handles (after Ray was shut down on purpose)."""
        self.stop_resender()  # not under the lock: the thread may be waiting for it
        with self._lock:
            atexit.unregister(self._flush_at_exit)
            self._held_errors.clear()
            self._writers = None
            self._session = None
            self._batches.clear()
            self._inflight_bytes = 0
            if self._arena is not None:
                self._arena.close()


def _object_store_payload(layout: bytes, array: np.ndarray) -> dict[str, Any]:
    # The ref is nested in a list so that Ray does not fetch it before the writer's method runs.
    return {"layout": layout, "data": (OBJECT_STORE, [ray.put(array)], array.nbytes)}


def _checkpoint_error(what: str, errors: dict[str, BaseException]) -> CheckpointError:
    details = "; ".join(f"{key}: {type(error).__name__}: {error}" for key, error in sorted(errors.items()))
    error = CheckpointError(f"{what}. {details}")
    error.__cause__ = next(iter(errors.values()))
    error.errors = errors  # type: ignore[attr-defined]
    return error
