"""The completion thread: a save whose bytes are still being copied from a GPU is sent to its writer
once its copy completed, and saves are sent in the order they were made.

A GPU save returns once its copies are queued (:mod:`fedckpt.runtime.cuda`); its records are STAGED
and the writer hears of it only when the bytes are in the staging memory (a writer never reads a
segment still being filled, and a ticket is written only then). This thread takes the saves in the
order they were made, sleeps on each one's copy events (blocking-sync events: no polling), runs its
host-side finish (a bounce buffer into its segment, Ray's object store), and sends it. A save made
while earlier ones wait here goes behind them, a host-memory save too: one key's saves keep their
order, so a newer save never gets the older sequence.

What this means for reading: a flush, or a load, in the saving process waits for these saves (their
records are tracked from the start); another process sees a GPU save once its copy completed and it
was sent. ``fedckpt.wait_staged()`` waits for that.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedckpt.runtime import threads
from fedckpt.runtime.inflight import SaveRecord

log = logging.getLogger("fedckpt")


class CopyInFlight(Protocol):
    """What the thread waits on (:class:`fedckpt.runtime.cuda.PendingCopy`)."""

    def complete(self, finish: bool = True) -> None: ...


@dataclass(eq=False)
class Completion:
    """One save call's records (one per key), and the copy they wait for (None: a host-memory save
    queued behind GPU ones)."""

    copy: CopyInFlight | None
    records: list[SaveRecord]
    number: int
    cancelled: bool = False


class Completions:
    """Args:
    deliver: sends the records (``Delivery.send`` with a deadline).
    fail: called with the records and the error when the copy, its finish or the sending failed.
    """

    def __init__(
        self, deliver: Callable[[list[SaveRecord]], None], fail: Callable[[list[SaveRecord], BaseException], None]
    ) -> None:
        self._deliver = deliver
        self._fail = fail
        self._queue: deque[Completion] = deque()
        self._changed = threading.Condition()
        self._submitted = 0
        self._delivered = 0  # every completion numbered up to this one was handled
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether saves made earlier are still waiting here (a new save must then wait behind them)."""
        with self._changed:
            return self._delivered < self._submitted

    def submit(self, copy: CopyInFlight | None, records: list[SaveRecord]) -> None:
        """Send ``records`` once ``copy`` completed (``copy`` None: once the saves before them went)."""
        with self._changed:
            self._submitted += 1
            self._queue.append(Completion(copy, records, self._submitted))
            self._changed.notify_all()
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:
                    threads.wake_on_stop(self._wake)
                self._thread = threads.start("fedckpt-gpu-completion", self._run)

    def wait_delivered(self, timeout: float | None) -> bool:
        """Block until every save submitted before now was sent (or failed); False on ``timeout``."""
        with self._changed:
            target = self._submitted
            return self._changed.wait_for(lambda: self._delivered >= target, timeout)

    def clear(self) -> None:
        """Drop what waits here (the pool went away: its records were dropped too); their copies are
        waited for, so that their memory can go back to its pool."""
        with self._changed:
            dropped = list(self._queue)
            self._queue.clear()
            for completion in dropped:
                completion.cancelled = True
            self._delivered = self._submitted
            self._changed.notify_all()
        for completion in dropped:
            if completion.copy is not None:
                completion.copy.complete(finish=False)

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue) or threads.stopping.is_set())
                if threads.stopping.is_set():  # exit: the flush before it sent everything it could
                    return
                completion = self._queue[0]
            try:
                if completion.copy is not None:
                    completion.copy.complete()
                if not completion.cancelled:
                    self._deliver(completion.records)
            except Exception as error:
                if not completion.cancelled:
                    self._fail(completion.records, error)
            finally:
                with self._changed:
                    if self._queue and self._queue[0] is completion:
                        self._queue.popleft()
                    self._delivered = max(self._delivered, completion.number)
                    self._changed.notify_all()
