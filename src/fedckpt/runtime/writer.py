"""The writer actor: per-key ordered, coalescing, background persistence of snapshots.

Each checkpoint key is owned by one writer of a fixed pool. For a key, saves are written one at a
time in the order they were acknowledged; a save not yet started is dropped once a newer one is
staged (latest wins). Not when the newer one merely arrives: its caller may still die before its
copy is complete, and then the older save is the one to write. File I/O runs on a small thread
pool so that the actor keeps answering enqueues, reads and flushes while it writes.

A writer that dies loses the saves queued in its memory; only their callers hold the snapshots and
can send them again. Every acknowledged save has an outstanding ``wait_saved`` call from its caller,
and Ray delivers those again to the restarted incarnation, which so learns which saves its
predecessor lost. It answers UNKNOWN (the caller sends the save again) and remembers them, so that
a flush or read from any process waits for those saves too, not only for what is in its queue.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import pickle
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from fedckpt.runtime.messages import (
    ABANDONED,
    FAILED,
    SAVED,
    SHARED_MEMORY,
    SUPERSEDED,
    UNKNOWN,
    Ack,
    SaveRequest,
)
from fedckpt.runtime.staging import SegmentReader, creator_pid
from fedckpt.storage.atomic import process_alive
from fedckpt.storage.local import persist_checkpoint

log = logging.getLogger("fedckpt.writer")

# How long a save acknowledged before its snapshot was copied waits for the copy to complete,
# and how often meanwhile it checks whether its caller died.
STAGING_TIMEOUT_SECONDS = 120.0
STAGING_CHECK_SECONDS = 0.5
# How long a restarted writer waits for a save its predecessor lost to be sent again, before a
# flush or read stops waiting for it (its caller presumably died too) and a warning names it.
RESEND_GRACE_SECONDS = 60.0
# Ray delivers the callers' outstanding calls to a restarted writer in no particular order: a flush
# or read that arrives this soon after the restart waits until this age, so that the ``wait_saved``
# calls naming the lost saves arrive first.
RESTART_SETTLE_SECONDS = 2.0


class _CallerDied(Exception):
    """The snapshot of a save is gone with the process that staged it.

    ``acknowledged``: whether the caller had been told the save was accepted (its call returned).
    """

    def __init__(self, reason: str, acknowledged: bool) -> None:
        super().__init__(reason)
        self.acknowledged = acknowledged


@dataclass(eq=False)
class _Save:
    request: SaveRequest
    sequence: tuple[int, int]
    payload: dict[str, Any]  # layout, and where the staged bytes are (see Coordinator.save)
    outcome: asyncio.Future
    staged: asyncio.Event  # set once the caller finished copying the snapshot
    segment: memoryview | None = None  # the caller's staging segment, mapped when the save arrived


@dataclass
class _Key:
    queue: deque[_Save] = field(default_factory=deque)
    active: _Save | None = None
    draining: bool = False
    error: BaseException | None = None

    def pending(self) -> list[_Save]:
        return ([self.active] if self.active else []) + list(self.queue)


def _lower_priority() -> None:
    """Run background I/O at a lower CPU priority (Linux: per thread), so that on a busy node
    training and this actor's own answers to enqueues come first."""
    with contextlib.suppress(OSError):
        os.nice(10)


def _transportable(error: BaseException) -> BaseException:
    """The error itself when Ray can send it to the caller, else a RuntimeError with its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


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
        self.keys: dict[str, _Key] = {}
        self.counts = {SAVED: 0, SUPERSEDED: 0, FAILED: 0, ABANDONED: 0}
        self.io = ThreadPoolExecutor(
            max_workers=io_threads, thread_name_prefix="fedckpt-io", initializer=_lower_priority
        )
        self.segments = SegmentReader()
        self.name = f"writer-{index}@{os.getpid()}"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.started = time.monotonic()
        self.restarted = _was_restarted()
        # Saves an earlier incarnation acknowledged and lost: key -> sequence -> a future resolved
        # once the save was sent again and left memory, was replaced on disk by a newer save of its
        # key, or its grace period ran out.
        self.awaiting_resend: dict[str, dict[tuple[int, int], asyncio.Future]] = {}
        self.resend_grace_seconds = RESEND_GRACE_SECONDS

    async def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pool_size": self.pool_size,
            "coalesce": self.coalesce,
            "io_threads": self.io_threads,
            "epoch": self.epoch,
            "restarted": self.restarted,
            "pid": os.getpid(),
            "node_id": self.node_id,
        }

    async def enqueue(self, request: SaveRequest, payload: dict[str, Any], staged: bool = True) -> Ack:
        """Queue a save and acknowledge at once; the write happens in the background.

        With ``staged=False`` the caller is still copying into the staging segment (the round trip
        overlaps the copy); the write starts when ``wait_saved(..., staged=True)`` says it is done.
        """
        where = payload["data"]
        if where[0] == SHARED_MEMORY and where[4] != self.node_id:  # not this node's shared memory
            return Ack(sequence=None, moved_to=self.node_id)
        state = self.keys.setdefault(request.key, _Key())
        # A save sent again after a restart of this writer: nobody waits for its arrival any longer.
        awaited = None if request.sequence is None else self._stop_awaiting(request.key, tuple(request.sequence))
        if state.error is not None:
            error, state.error = state.error, None
            if awaited is not None:
                awaited.set_result(None)  # its caller hears of the error instead
            return Ack(sequence=None, error=error)
        if request.sequence is not None:
            sequence = tuple(request.sequence)
        else:
            self.number += 1
            sequence = (self.epoch, self.number)
        save = _Save(request, sequence, payload, asyncio.get_running_loop().create_future(), asyncio.Event())
        if payload["data"][0] == SHARED_MEMORY:
            # Mapped now, before the ack: a save whose call returned stays readable even if its
            # caller dies and another process removes the segment file.
            save.segment = self.segments.open(payload["data"][1])
        if staged:
            save.staged.set()
        if awaited is not None:  # from now on, waiting for the save itself covers it
            save.outcome.add_done_callback(lambda _: awaited.done() or awaited.set_result(None))
        bisect.insort(state.queue, save, key=lambda queued: queued.sequence)  # a re-sent save can be older
        if staged:
            self._coalesce(state)
        if not state.draining:
            state.draining = True
            asyncio.get_running_loop().create_task(self._drain(request.key, state))
        return Ack(sequence=sequence, writer_epoch=self.epoch)

    def _coalesce(self, state: _Key) -> None:
        """Latest wins: the queued saves older than the newest staged one will never be needed.

        Called when a save becomes staged. A save re-sent after a writer restart can be the older one.
        """
        staged = [queued.sequence for queued in state.queue if queued.staged.is_set()]
        if not self.coalesce or not staged:
            return
        for queued in [queued for queued in state.queue if queued.sequence < max(staged)]:
            state.queue.remove(queued)
            queued.outcome.set_result(SUPERSEDED)
            self.counts[SUPERSEDED] += 1

    async def wait_saved(self, key: str, sequence: tuple[int, int], writer_epoch: int, staged: bool = False) -> str:
        """Wait until one save left memory: saved, superseded or failed (``staged``: the caller's
        copy is complete, the write may start).

        ``UNKNOWN`` when an earlier incarnation of this writer took the save: it died with it.
        """
        sequence = tuple(sequence)
        if writer_epoch != self.epoch:  # an earlier incarnation took the save, and died with it
            self._await_resend(key, sequence)
            return UNKNOWN
        state = self.keys.get(key)
        for save in state.pending() if state else []:
            if save.sequence == sequence:
                if staged:
                    save.staged.set()
                    self._coalesce(state)
                return await save.outcome
        return SAVED if state is None or state.error is None else FAILED

    async def wait_key(self, key: str) -> BaseException | None:
        """Wait for every save of ``key`` issued before this call, also those an earlier incarnation
        lost (until they are sent again); return (and clear) its error."""
        await self._settle_after_restart()
        state = self.keys.get(key)
        resends = list(self.awaiting_resend.get(key, {}).values())
        await asyncio.gather(*(save.outcome for save in (state.pending() if state else [])), *resends)
        state = self.keys.get(key)
        if state is None:
            return None
        error, state.error = state.error, None
        return error

    async def flush(self, keys: list[str] | None = None) -> dict[str, BaseException]:
        """Wait for every save (of ``keys``, or all) issued before this call; return and clear errors."""
        await self._settle_after_restart()
        known = self.keys.keys() | self.awaiting_resend.keys()
        selected = list(known) if keys is None else [key for key in keys if key in known]
        outcomes = [save.outcome for key in selected if key in self.keys for save in self.keys[key].pending()]
        resends = [awaited for key in selected for awaited in self.awaiting_resend.get(key, {}).values()]
        await asyncio.gather(*outcomes, *resends)
        errors = {}
        for key in selected:
            state = self.keys.get(key)  # idle keys without errors are forgotten meanwhile
            if state is not None and state.error is not None:
                errors[key], state.error = state.error, None
        return errors

    async def stop(self) -> None:
        """Finish every queued save, then end this actor (it is not restarted)."""
        await self.flush()
        self.io.shutdown(wait=True)
        ray.actor.exit_actor()

    async def stats(self) -> dict[str, int]:
        """Saves written, superseded and failed by this incarnation; keys and saves still pending;
        saves an earlier incarnation lost that have not been sent again yet."""
        pending = sum(len(state.pending()) for state in self.keys.values())
        awaiting = sum(len(sequences) for sequences in self.awaiting_resend.values())
        return {
            **self.counts,
            "keys": len(self.keys),
            "pending": pending,
            "awaiting_resend": awaiting,
            "pid": os.getpid(),
        }

    # ---- saves an earlier incarnation lost ------------------------------------------------

    async def _settle_after_restart(self) -> None:
        """Right after a restart, give the callers' redelivered ``wait_saved`` calls time to arrive."""
        if self.restarted:
            left = RESTART_SETTLE_SECONDS - (time.monotonic() - self.started)
            if left > 0:
                await asyncio.sleep(left)

    def _await_resend(self, key: str, sequence: tuple[int, int]) -> None:
        """Remember a lost save until its caller sends it again (bounded by the grace period)."""
        awaited = self.awaiting_resend.setdefault(key, {})
        if sequence in awaited:
            return
        loop = asyncio.get_running_loop()
        awaited[sequence] = loop.create_future()
        loop.call_later(self.resend_grace_seconds, self._give_up_resend, key, sequence)

    def _stop_awaiting(self, key: str, sequence: tuple[int, int]) -> asyncio.Future | None:
        """Forget one awaited save; returns its future (not resolved yet) if it was awaited."""
        awaited = self.awaiting_resend.get(key, {})
        future = awaited.pop(sequence, None)
        if not awaited:
            self.awaiting_resend.pop(key, None)
        return future

    def _give_up_resend(self, key: str, sequence: tuple[int, int]) -> None:
        future = self._stop_awaiting(key, sequence)
        if future is not None and not future.done():
            log.warning(
                "fedckpt: a save of %s (sequence %s) that an earlier incarnation of %s lost was not sent "
                "again within %.0f s (its caller presumably died too); flushes no longer wait for it, "
                "and the checkpoint on disk stays at its last written version",
                key,
                sequence,
                self.name,
                self.resend_grace_seconds,
            )
            future.set_result(None)

    def _superseded_on_disk(self, key: str, sequence: tuple[int, int]) -> None:
        """A save of ``key`` is on disk: lost saves older than it need not be waited for."""
        for older in [awaited for awaited in self.awaiting_resend.get(key, {}) if awaited < sequence]:
            future = self._stop_awaiting(key, older)
            if future is not None and not future.done():
                future.set_result(None)

    async def _staged_bytes(self, save: _Save) -> memoryview:
        """The staged bytes of a save: a caller's shared-memory segment on this node, or a Ray object."""
        where = save.payload["data"]
        if where[0] == SHARED_MEMORY:
            assert save.segment is not None
            if not await self._copy_complete(save):
                raise _CallerDied("its caller died before it finished copying the snapshot", acknowledged=False)
            return save.segment[: where[2]]
        _, refs, length = where
        try:
            array = await refs[0]
        except ray.exceptions.ObjectLostError as error:  # OwnerDiedError among them
            reason = f"its snapshot was lost with its caller before this writer fetched it ({type(error).__name__})"
            raise _CallerDied(reason, acknowledged=True) from error
        return memoryview(array)[:length]

    async def _copy_complete(self, save: _Save) -> bool:
        """Wait until the caller's copy into the segment is complete (True), or it died first (False)."""
        _, path, _, token, _ = save.payload["data"]
        waited = 0.0
        while True:
            try:
                await asyncio.wait_for(save.staged.wait(), STAGING_CHECK_SECONDS)
                return True
            except TimeoutError:
                waited += STAGING_CHECK_SECONDS
            if SegmentReader.staged_mark(save.segment) == token:  # the message died with the caller
                return True
            pid = creator_pid(path)
            if pid is not None and not process_alive(pid):
                return False
            if waited >= STAGING_TIMEOUT_SECONDS:
                raise RuntimeError(
                    f"the caller did not finish copying this snapshot within {STAGING_TIMEOUT_SECONDS} s; "
                    "the checkpoint on disk is unchanged"
                )

    async def _drain(self, key: str, state: _Key) -> None:
        loop = asyncio.get_running_loop()
        while state.queue:
            save = state.queue.popleft()
            state.active = save
            outcome = FAILED
            try:
                data = await self._staged_bytes(save)
                request = save.request
                entry = await loop.run_in_executor(
                    self.io,
                    persist_checkpoint,
                    key,
                    request.kind,
                    pickle.loads(save.payload["layout"]),
                    data,
                    save.sequence,
                    request.score,
                    request.score_name,
                    self.name,
                )
                del data
                outcome = SAVED if entry is not None else SUPERSEDED
                self._superseded_on_disk(key, save.sequence)  # this save or a newer one is on disk
            except _CallerDied as reason:  # nobody is left to hear of it
                level = logging.ERROR if reason.acknowledged else logging.WARNING
                log.log(level, "fedckpt: dropped a save of %s: %s; the checkpoint on disk is unchanged", key, reason)
                outcome = ABANDONED
            except Exception as error:  # held for the caller: next call, flush or load
                log.error("fedckpt: saving %s failed: %s: %s", key, type(error).__name__, error)
                state.error = _transportable(error)
            finally:
                save.segment = None
                if save.payload["data"][0] == SHARED_MEMORY:
                    self.segments.finished(save.payload["data"][1])
                state.active = None
                self.counts[outcome] += 1
                save.outcome.set_result(outcome)
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
