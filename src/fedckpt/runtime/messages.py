"""What the caller side and the writer actors send each other."""

from __future__ import annotations

from dataclasses import dataclass

# Outcomes of one save, as the writer reports them.
SAVED = "saved"
SUPERSEDED = "superseded"  # a newer save of the same key replaced it before or on disk
FAILED = "failed"  # the error is held for the next call, flush or load of that key
UNKNOWN = "unknown"  # issued to an earlier incarnation of a restarted writer: send it again
# Its caller died before the snapshot was staged (its call never returned), or, for a writer on
# another node, before the writer fetched it: there is nothing left to write.
ABANDONED = "abandoned"

# Where a save's staged bytes are: ("shm", segment path, length, staged token, caller's node id)
# on the writer's node, or ("object", [ObjectRef], length) in Ray's object store (a writer on
# another node).
SHARED_MEMORY = "shm"
OBJECT_STORE = "object"


@dataclass(frozen=True)
class SaveRequest:
    """One save of one checkpoint; the snapshot travels beside it as an ObjectRef."""

    key: str
    kind: str
    score: float | None = None
    score_name: str | None = None
    # The (writer epoch, number) a save was first acknowledged with; set when it is re-sent
    # after a writer restart, so that it still loses against anything issued after it.
    sequence: tuple[int, int] | None = None


@dataclass(frozen=True)
class Ack:
    """Answer to an enqueue: the save's sequence, or the error of an earlier save of that key.

    When ``error`` is set the new save was *not* enqueued: the caller raises, and may call again.
    When ``moved_to`` is set it was not enqueued either: the caller staged it in shared memory for
    a writer on its node, but the writer now runs on node ``moved_to`` (Ray restarted it there);
    the caller sends it again through the object store.
    """

    sequence: tuple[int, int] | None
    writer_epoch: int | None = None  # the incarnation that took the save; it alone can report on it
    error: BaseException | None = None
    moved_to: str | None = None
