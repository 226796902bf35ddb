"""This process's saves, each one record from before it is sent until it is durable or failed.

Every save is a :class:`SaveRecord`, created (and findable by its id) before anything is sent, so
that no answer of a writer can arrive for a save this process does not know. Its states:

```
            sent on a channel, or            the writer's answer       its notice:
            an enqueue call made             (Ray calls)               saved / superseded
  STAGED -------------------------> SENT -------------------> ACKNOWLEDGED -----------> DURABLE
    ^                                 |                            |
    |  its writer died, on the        |                            |   its notice: failed, abandoned,
    +--- channel it was sent on, or --+----------------------------+   or its writer gone for good
         the writer says it lost it                                +-----------------------------> FAILED
```

A save that goes back to STAGED keeps the sequence it was acknowledged with and is sent again
(:mod:`~fedckpt.runtime.delivery`). Every transition is a method of :class:`InflightSaves`, guarded
by the state it starts from, so that the order in which threads (the saving thread, the watcher,
Ray's callback threads) report them does not matter: a notice read before its send was recorded
finishes the save all the same, and nothing takes a finished save back.

A snapshot's staged bytes (:class:`Batch`, shared by the saves of all its keys) are kept until every
save of it is finished: until then, a writer restart can send it back to STAGED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from fedckpt.runtime.messages import Outcome, SaveDone, SaveRequest

log = logging.getLogger("fedckpt")


class SaveState(Enum):
    STAGED = "staged"  # bytes staged; no writer holds it (not sent yet, or lost with its writer)
    SENT = "sent"  # posted on a channel, or an enqueue call made, not answered yet
    ACKNOWLEDGED = "acknowledged"  # a writer holds it under its sequence
    DURABLE = "durable"  # on storage (or replaced there by a newer save of its key)
    FAILED = "failed"  # ``error`` says why; reported once, by a flush or the next save of its key


FINISHED = frozenset({SaveState.DURABLE, SaveState.FAILED})
WITH_A_WRITER = frozenset({SaveState.SENT, SaveState.ACKNOWLEDGED})


@dataclass(eq=False)
class Batch:
    """One staged snapshot (``staged``: a transport's :class:`~fedckpt.runtime.transport.Staged`) and
    its saves, one per key."""

    staged: Any
    nbytes: int
    records: list[SaveRecord] = field(default_factory=list)

    def finished(self) -> bool:
        return all(record.finished for record in self.records)


@dataclass(eq=False)
class SaveRecord:
    """One save of one checkpoint, from before it is sent until it is durable or failed."""

    save_id: str
    request: SaveRequest  # its sequence is set once a writer (or its counter) numbered it
    writer: int  # the index of its key's home
    batch: Batch
    state: SaveState = SaveState.STAGED
    channel: Any = None  # the ChannelClient it was last sent on (None: a Ray call)
    epoch: int | None = None  # the writer incarnation it was last sent to
    done_ref: Any = None  # Ray route: ``wait_saved``, resolved when it left the writer
    error: BaseException | None = None
    sends: int = 0

    @property
    def key(self) -> str:
        return self.request.key

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def lost(self) -> bool:
        """Sent before, and no writer holds it now: to be sent again."""
        return self.state is SaveState.STAGED and self.sends > 0


# Ids of saves finished lately: a second notice of one of them (it was sent twice: to a writer
# thought dead, and again) is expected, not an unknown save.
RECENTLY_FINISHED = 4096


class InflightSaves:
    """This process's unfinished saves by id, with their batches (oldest first)."""

    def __init__(self, on_release: Callable[[Batch], None]) -> None:
        self._on_release = on_release  # a batch none of whose saves needs its bytes any more
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on every transition
        self._batches: deque[Batch] = deque()
        self._records: dict[str, SaveRecord] = {}
        self._lost: dict[str, SaveRecord] = {}  # back to STAGED after a send: to send again
        self._recently_finished: OrderedDict[str, None] = OrderedDict()
        self._failed: dict[str, BaseException] = {}  # key -> the error of its last failed save, not reported yet
        self._ids = 0
        self._prefix = f"{id(self):x}-{time.time_ns():x}"  # process-unique; a writer tells callers apart by it
        self.nbytes = 0
        self.unknown_notices = 0
        self.transitions = 0  # counts every notify of ``changed``: a waiter's "anything new?"

    # ---- creation -------------------------------------------------------------------------------

    def add(self, staged: Any, nbytes: int, requests: list[tuple[SaveRequest, int]]) -> Batch:
        """Track a staged snapshot and one record per ``(request, home index)``, all STAGED."""
        batch = Batch(staged, nbytes)
        with self._lock:
            for request, writer in requests:
                self._ids += 1
                save_id = f"{self._prefix}-{self._ids}"
                record = SaveRecord(save_id, replace(request, save_id=save_id), writer, batch)
                batch.records.append(record)
                self._records[save_id] = record
            self._batches.append(batch)
            self.nbytes += nbytes
        return batch

    # ---- transitions ----------------------------------------------------------------------------

    def claim(self, records: Iterable[SaveRecord]) -> list[SaveRecord]:
        """STAGED -> SENT for the caller that sends them: the records it won (another thread may be
        sending some of them already)."""
        claimed = []
        with self._lock:
            for record in records:
                if record.state is SaveState.STAGED:
                    record.state = SaveState.SENT
                    record.sends += 1
                    self._lost.pop(record.save_id, None)
                    claimed.append(record)
            if claimed:
                self._changed()
        return claimed

    def sent_on(self, records: list[SaveRecord], requests: list[SaveRequest], channel: Any, epoch: int) -> None:
        """Claimed saves go out, each as ``requests`` says (its sequence), on ``channel`` (None: a Ray
        call) to incarnation ``epoch``: recorded before they go, so that the writer's death finds them."""
        with self._lock:
            for record, request in zip(records, requests, strict=True):
                if record.state is SaveState.SENT:
                    record.request, record.channel, record.epoch = request, channel, epoch

    def acknowledged(
        self,
        record: SaveRecord,
        sequence: tuple[int, int] | None = None,
        done_ref: Any = None,
        epoch: int | None = None,
    ) -> None:
        """SENT -> ACKNOWLEDGED (a notice may have finished it already, or a dead writer lost it)."""
        with self._lock:
            if record.state is SaveState.SENT:
                if sequence is not None:
                    record.request = replace(record.request, sequence=tuple(sequence))
                record.done_ref = done_ref
                record.epoch = record.epoch if epoch is None else epoch
                record.state = SaveState.ACKNOWLEDGED
                self._changed()

    def lost(self, records: Iterable[SaveRecord]) -> None:
        """SENT or ACKNOWLEDGED -> STAGED: its writer will not finish it; it is sent again."""
        with self._lock:
            for record in records:
                if record.state in WITH_A_WRITER:
                    self._back_to_staged(record)
            self._changed()

    def lost_on(self, channel: Any) -> list[SaveRecord]:
        """Every save last sent on ``channel`` (its writer died) -> STAGED; returns them."""
        with self._lock:
            found = [record for record in self._records.values() if record.channel is channel]
        self.lost(found)
        return found

    def lost_with(self, writer: int, epoch: int) -> list[SaveRecord]:
        """Every save that incarnation ``epoch`` of writer ``writer`` held -> STAGED; returns them."""
        with self._lock:
            found = [r for r in self._records.values() if r.writer == writer and r.epoch == epoch]
        self.lost(found)
        return found

    def finished(self, notice: SaveDone) -> SaveRecord | None:
        """A writer's notice: the save is DURABLE or FAILED. A notice for a save this process never
        tracked is counted and logged (it should not happen); a second one for a finished save is not."""
        outcome = notice.outcome
        with self._lock:
            record = self._records.get(notice.save_id or "")
            if record is None:
                if notice.save_id not in self._recently_finished:
                    self.unknown_notices += 1
                    log.error("fedckpt: a writer reported save %s (%s), which this process does not track",
                              notice.save_id, outcome.value)  # fmt: skip
                return None
            if outcome is Outcome.UNKNOWN:  # sent to an incarnation that died with it
                if record.state in WITH_A_WRITER:
                    self._back_to_staged(record)
                    self._changed()
                return record
            if outcome in (Outcome.SAVED, Outcome.SUPERSEDED):
                self._finish(record, SaveState.DURABLE, None)
            else:
                self._finish(record, SaveState.FAILED, notice.error or RuntimeError(f"the save was {outcome.value}"))
            return record

    def failed(self, record: SaveRecord, error: BaseException) -> None:
        """Any unfinished state -> FAILED: it cannot reach storage (its writer is gone for good, or
        its bytes never left the GPU). A record :meth:`clear` dropped is left alone."""
        with self._lock:
            if not record.finished and self._records.get(record.save_id) is record:
                self._finish(record, SaveState.FAILED, error)

    def _back_to_staged(self, record: SaveRecord) -> None:
        record.state, record.channel, record.done_ref = SaveState.STAGED, None, None
        self._lost[record.save_id] = record

    def _finish(self, record: SaveRecord, state: SaveState, error: BaseException | None) -> None:
        record.state, record.error, record.channel, record.done_ref = state, error, None, None
        self._lost.pop(record.save_id, None)
        del self._records[record.save_id]
        self._recently_finished[record.save_id] = None
        while len(self._recently_finished) > RECENTLY_FINISHED:
            self._recently_finished.popitem(last=False)
        if error is not None:
            self._failed[record.key] = error
        batch = record.batch
        if batch.finished():
            self._batches.remove(batch)
            self.nbytes -= batch.nbytes
            self._on_release(batch)
        self._changed()

    def _changed(self) -> None:
        self.transitions += 1
        self.changed.notify_all()

    # ---- queries --------------------------------------------------------------------------------

    def unfinished(self, keys: set[str] | None = None) -> list[SaveRecord]:
        with self._lock:
            return [r for r in self._records.values() if keys is None or r.key in keys]

    def settled(self, keys: set[str]) -> bool:
        """Whether every save of ``keys`` this process made is finished, with no failure unreported."""
        with self._lock:
            return not any(key in self._failed for key in keys) and not any(
                record.key in keys for record in self._records.values()
            )

    def lost_records(self, writer: int | None = None) -> list[SaveRecord]:
        """Saves lost with their writer (of ``writer``, or any), to send again."""
        with self._lock:
            return [r for r in self._lost.values() if writer in (None, r.writer)]

    def oldest(self) -> Batch | None:
        with self._lock:
            return self._batches[0] if self._batches else None

    def pending(self) -> tuple[int, int, int]:
        """(saves not finished, bytes staged for them, notices of saves never tracked)."""
        with self._lock:
            return len(self._records), self.nbytes, self.unknown_notices

    def take_errors(self, keys: set[str] | None) -> dict[str, BaseException]:
        """The errors of failed saves of ``keys`` (None: all) not reported yet; each is reported once."""
        with self._lock:
            chosen = [key for key in self._failed if keys is None or key in keys]
            return {key: self._failed.pop(key) for key in chosen}

    def mark_reported(self, keys: Iterable[str]) -> None:
        """A flush raised an error for each of ``keys`` (a writer held it): the same failure seen in
        this process's records is not raised again."""
        with self._lock:
            for key in keys:
                self._failed.pop(key, None)

    def wait_until(self, condition: Callable[[], bool], deadline: float | None) -> bool:
        """Block until ``condition()`` (checked at each transition) holds, or ``deadline`` (a
        ``time.monotonic`` value) passed; returns the condition's last value."""
        with self._lock:
            return self.changed.wait_for(condition, None if deadline is None else max(0.0, deadline - time.monotonic()))

    def clear(self) -> list[Batch]:
        """Forget everything (the pool went away); returns the batches, to release."""
        with self._lock:
            batches, self._batches = list(self._batches), deque()
            self._records.clear()
            self._lost.clear()
            self._failed.clear()
            self.nbytes = 0
            self._changed()
            return batches
