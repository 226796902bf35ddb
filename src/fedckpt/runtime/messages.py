"""What the caller side and the writer actors send each other, over Ray calls or the node-local channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """How one save left the writer, as the writer reports it."""

    SAVED = "saved"
    SUPERSEDED = "superseded"  # a newer save of the same key replaced it before or on disk
    FAILED = "failed"  # the error is held for the next call, flush or load of that key
    UNKNOWN = "unknown"  # issued to an earlier incarnation of a restarted writer: send it again
    # The caller died before the writer fetched the snapshot from Ray's object store: nothing is left
    # to write. A failure like FAILED (its error is held for the key), named apart in the counters.
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class SharedMemoryPayload:
    """A snapshot staged in a shared-memory segment on the caller's node, mapped there by the key's
    home (on that node) or by the node's writer (a home elsewhere has it written there).

    The caller sends it only once its copy is complete, and reuses the segment only after the
    writer reported the save done.
    """

    path: str
    nbytes: int
    layout: bytes  # the snapshot's pickled layout
    node_id: str  # the Ray node whose /dev/shm holds the segment


@dataclass(frozen=True)
class ObjectStorePayload:
    """A snapshot staged in Ray's object store: for a writer on another node."""

    refs: list[Any]  # [ObjectRef]: nested in a list so that Ray does not fetch it before the writer wants it
    nbytes: int
    layout: bytes


Payload = SharedMemoryPayload | ObjectStorePayload


@dataclass(frozen=True)
class VersionRequest:
    """A save that also keeps its round's version (``fedckpt.retention``): the writer makes the version
    once the plain name is durable, then removes the versions ``policy`` drops."""

    server_round: int | None  # None: the writer numbers it after the newest version on storage
    scores: dict[str, float]  # what the policy ranks it by
    policy: bytes  # the RetentionPolicy, cloudpickled (a user's own class may live in __main__)
    round_clients: int | None = None  # a server state: the clients whose states its round commits


@dataclass(frozen=True)
class SaveRequest:
    """One save of one checkpoint."""

    key: str
    kind: str
    score: float | None = None
    score_name: str | None = None
    # The (writer epoch, number) a save was first acknowledged with; set when it is sent again
    # after a writer restart, so that it still loses against anything issued after it.
    sequence: tuple[int, int] | None = None
    # fsspec options of a checkpoint URL (credentials, endpoint); never shown in a repr.
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Unique per save (its caller's record): a writer answers by it, and takes a save sent twice once.
    save_id: str | None = None
    version: VersionRequest | None = None  # keep this save's round as a version too


@dataclass(frozen=True)
class Ack:
    """Answer to an enqueue made with a Ray call: the sequence the writer gave the save."""

    sequence: tuple[int, int]
    writer_epoch: int  # the incarnation that took the save; it alone can report on it


@dataclass(frozen=True)
class PoolShape:
    """What every writer of a pool is created with, fixed by the process that creates the pool."""

    pool_size: int  # homes: key k belongs to home shard_of(k, pool_size)
    writers_per_node: int  # node writers per node (docs/design.md: clusters)
    coalesce: bool
    io_threads: int
    job_id: str | None  # the Ray job whose end ends the pool (None: a named pool, shared by jobs)
    namespace: str  # the pool's Ray namespace


@dataclass(frozen=True)
class WriterInfo:
    """Who a writer is and where it runs (``describe``)."""

    index: int
    pool_size: int
    writers_per_node: int
    coalesce: bool
    io_threads: int
    epoch: int
    restarted: bool
    pid: int
    node_id: str
    channel_address: str | None  # where callers on its node reach it (None: Ray calls only)
    counter_path: str | None  # its sequence counter, which callers on its node take numbers from
    version: str  # fedckpt's version in the writer: a pool of another version is not joined
    job_id: str | None  # the Ray job whose end ends the pool (None: a named pool, shared by jobs)


@dataclass
class WriterStats:
    """One writer incarnation's counters."""

    saved: int
    superseded: int
    failed: int
    abandoned: int
    keys: int  # keys with saves pending or an error to report
    pending: int  # saves not yet written
    awaiting_resend: int  # saves an earlier incarnation lost that were not sent again yet
    bytes_written: int  # checkpoint bytes written to storage
    bytes_linked: int  # checkpoint bytes not written because identical content was linked
    pid: int
    waits_answered: int = 0  # waits and flushes callers on this node sent over the channel
    resends: int = 0  # saves received again after an earlier incarnation lost them
    node_id: str = ""


# ---- the node-local channel (see fedckpt.runtime.channel) ----------------------------------------


@dataclass(frozen=True)
class Enqueue:
    """Queue one staged snapshot under each request's key. Not answered: each request carries the
    sequence its caller took from the writer's counter, and a ``SaveDone`` follows each save."""

    requests: list[SaveRequest]
    payload: SharedMemoryPayload


@dataclass(frozen=True)
class WaitCall:
    """Wait until every save of ``keys`` (None: of all keys) issued before it left memory; answered
    with the errors held for those keys (and clears them)."""

    call_id: int
    keys: list[str] | None


@dataclass(frozen=True)
class Reply:
    call_id: int
    value: Any


@dataclass(frozen=True)
class SaveDone:
    """A save left the writer's memory: pushed to the connection that enqueued it, and the answer
    of ``wait_saved``. ``error`` is why it FAILED (the writer also holds it for the next flush or
    wait of its key, from any process)."""

    sequence: tuple[int, int]
    outcome: Outcome
    error: BaseException | None = None
    save_id: str | None = None
