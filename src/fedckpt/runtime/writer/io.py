"""The writer's I/O: a save's staged bytes to storage, on a small thread pool.

Kept apart from the per-key queue (``queue.py``) and the restart bookkeeping (``recovery.py``): this
part knows where a save's bytes are and how they reach a file, not in what order saves go.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from fedckpt.errors import SaveLostError
from fedckpt.runtime.messages import Outcome
from fedckpt.runtime.writer import retention_step
from fedckpt.runtime.writer.process import lower_priority
from fedckpt.runtime.writer.queue import QueuedSave
from fedckpt.runtime.writer.staged import CallerDied, StagedBytes

# posix (the local backend: zip layout, ISA-L, direct I/O) is imported as the writer starts, before
# the first round's saves arrive, not by the first write while the callers' first round runs.
from fedckpt.storage import posix  # noqa: F401
from fedckpt.storage.base import Persisted, SaveTarget, storage_for
from fedckpt.storage.dedup import ContentIndex

log = logging.getLogger("fedckpt.writer")


def transportable(error: BaseException) -> BaseException:
    """The error itself when it can be sent to the caller, else a RuntimeError with its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class WriteOutcome:
    """How one save ended: SAVED, SUPERSEDED (this version or a newer one was on storage), FAILED or
    ABANDONED (both with an error)."""

    outcome: Outcome
    error: BaseException | None = None
    persisted: Persisted | None = None


class SaveIO:
    """Writes saves' staged bytes to storage; one save of a key at a time is the caller's concern."""

    def __init__(self, io_threads: int, writer_name: str) -> None:
        self.writer_name = writer_name
        self.staged = StagedBytes()
        self.content_index = ContentIndex()
        self.executor = ThreadPoolExecutor(
            max_workers=io_threads, thread_name_prefix="fedckpt-io", initializer=lower_priority
        )

    def map_segment(self, save: QueuedSave) -> None:
        """Map the save's staging segment as it arrives (see :meth:`StagedBytes.map`)."""
        save.segment = self.staged.map(save.payload)

    async def write(self, save: QueuedSave, look_first: bool = False) -> WriteOutcome:
        """Fetch the save's bytes and persist them; every error becomes the outcome, for its caller.

        ``look_first``: a save sent again (an earlier incarnation of its writer may have written it,
        or a newer one) is checked against storage before anything is written.
        """
        key = save.request.key
        loop = asyncio.get_running_loop()
        try:
            if look_first and await loop.run_in_executor(self.executor, self._on_storage_already, save):
                return WriteOutcome(Outcome.SUPERSEDED)
            data = await self.staged.get(save.payload, save.segment)
            persisted = await loop.run_in_executor(self.executor, self._persist, save, data)
            del data
            return WriteOutcome(Outcome.SUPERSEDED if persisted is None else Outcome.SAVED, persisted=persisted)
        except CallerDied as reason:  # its bytes are gone: an acknowledged save that cannot be written
            log.error("fedckpt: a save of %s is lost: %s; the checkpoint on storage is unchanged", key, reason)
            return WriteOutcome(Outcome.ABANDONED, SaveLostError(f"{key}: {reason}"))
        except Exception as error:  # for its caller (next call) and the next flush or load of the key
            log.error("fedckpt: saving %s failed: %s: %s", key, type(error).__name__, error)
            return WriteOutcome(Outcome.FAILED, transportable(error))
        finally:
            self.staged.finished(save.payload)

    async def number_round(self, save: QueuedSave) -> WriteOutcome | None:
        """Give a save that keeps its round, but came without one, the next number of its name (in its
        request, so that its entry records it); a FAILED outcome if storage cannot be read."""
        loop = asyncio.get_running_loop()
        assert save.request.version is not None
        try:
            number = await loop.run_in_executor(self.executor, retention_step.next_round, save.request, save.sequence)
        except Exception as error:
            log.error(
                "fedckpt: numbering the round of %s failed: %s: %s", save.request.key, type(error).__name__, error
            )
            return WriteOutcome(Outcome.FAILED, transportable(error))
        save.request = replace(save.request, version=replace(save.request.version, server_round=number))
        return None

    async def keep_round(self, save: QueuedSave, written: WriteOutcome) -> WriteOutcome:
        """After a save of a checkpoint with a retention policy is durable: its round's version, and
        the deletions the policy asks for (:mod:`~fedckpt.runtime.writer.retention_step`). A failure
        makes the save's outcome FAILED: the caller hears that its round was not kept as asked."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, retention_step.keep_round, save.request, save.sequence)
        except Exception as error:
            log.error("fedckpt: keeping the rounds of %s failed: %s: %s", save.request.key, type(error).__name__, error)
            return WriteOutcome(Outcome.FAILED, transportable(error), written.persisted)
        return written

    @staticmethod
    def _on_storage_already(save: QueuedSave) -> bool:
        """Whether storage holds this save's sequence, or a newer one, of its key."""
        entry = storage_for(save.request.key, save.request.storage_options).read_entry(save.request.key)
        return entry is not None and tuple(entry.sequence) >= save.sequence

    def _persist(self, save: QueuedSave, data: memoryview) -> Persisted | None:
        """The I/O thread's part of one save."""
        request = save.request
        version = request.version
        target = SaveTarget(
            request.key, request.kind, pickle.loads(save.payload.layout), save.sequence, request.score,
            request.score_name, self.writer_name,
            server_round=None if version is None else version.server_round,
            scores=None if version is None else version.scores,
            round_clients=None if version is None else version.round_clients,
        )  # fmt: skip
        return storage_for(request.key, request.storage_options).persist(target, data, self.content_index)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
