"""One key's queue in a writer: saves in sequence order, one written at a time, latest wins."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fedckpt.runtime.messages import Payload, SaveRequest
from fedckpt.runtime.sequence import bucket_of


@dataclass(eq=False)
class QueuedSave:
    request: SaveRequest
    sequence: tuple[int, int]
    payload: Payload
    outcome: asyncio.Future  # resolves to a SaveDone (saved, superseded, failed, abandoned) once it left memory
    segment: memoryview | None = None  # the caller's staging segment, mapped when the save arrived
    arrived: float = field(default_factory=time.monotonic)
    listeners: list[Any] = field(default_factory=list)  # channel connections that hear its SaveDone

    @property
    def save_id(self) -> str | None:
        return self.request.save_id


@dataclass
class KeyQueue:
    """The saves of one key not yet written, the one being written, and an error to report."""

    queue: deque[QueuedSave] = field(default_factory=deque)
    active: QueuedSave | None = None
    draining: bool = False
    error: BaseException | None = None

    def pending(self) -> list[QueuedSave]:
        return ([self.active] if self.active else []) + list(self.queue)

    def add(self, save: QueuedSave, coalesce: bool) -> list[QueuedSave]:
        """Queue ``save`` in sequence order (a save sent again after a writer restart can be older
        than what is queued). With ``coalesce``, returns the queued saves it makes unnecessary.

        Every save arrives with its bytes complete, so the newest queued one is always writable
        and the older ones will never be needed (unless they keep a round version of their own).
        """
        bisect.insort(self.queue, save, key=lambda queued: queued.sequence)
        if not coalesce:
            return []
        newest = self.queue[-1].sequence
        # A save that keeps its round as a version is never dropped: its round is not the newer one's.
        dropped = [queued for queued in self.queue if queued.sequence < newest and queued.request.version is None]
        for queued in dropped:
            self.queue.remove(queued)
        return dropped

    def take_error(self) -> BaseException | None:
        """The error to report (each is reported once)."""
        error, self.error = self.error, None
        return error


class KeyQueues(dict[str, KeyQueue]):
    """A writer's queues by key, counting the keys of each bucket (:mod:`fedckpt.runtime.sequence`):
    a bucket with no key here has nothing pending and no error held."""

    def __init__(self) -> None:
        super().__init__()
        self.per_bucket: dict[int, int] = {}

    def __setitem__(self, key: str, queue: KeyQueue) -> None:
        if key not in self:
            bucket = bucket_of(key)
            self.per_bucket[bucket] = self.per_bucket.get(bucket, 0) + 1
        super().__setitem__(key, queue)

    def setdefault(self, key: str, default: KeyQueue) -> KeyQueue:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        bucket = bucket_of(key)
        self.per_bucket[bucket] -= 1
        if not self.per_bucket[bucket]:
            del self.per_bucket[bucket]
