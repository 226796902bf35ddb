"""This process's saves between their acknowledgement and their leaving the writer's memory.

Each save is a small state machine; every transition is a method of :class:`InflightSaves`:

```
              sent                SaveDone / wait_saved: saved, superseded, failed
  (save) ----------------> SENT ---------------------------------------------------> DONE
                           |  ^
   its writer died, or     |  |  sent again, with the same sequence
   its bytes were lost     v  |
                           LOST
```

The staged bytes of a snapshot (one per call, shared by the saves of all its keys) stay in memory
until every save of it is DONE: until then, a writer restart can make it LOST, and this process
must send it again. Backpressure waits on the oldest snapshot while the bytes held exceed the budget.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from fedckpt.runtime.messages import SaveRequest
from fedckpt.runtime.transport import Enqueued, Route, Staged


class SaveState(Enum):
    SENT = "sent"  # on its way to the writer, or held there, not finished with
    LOST = "lost"  # its writer died (or lost its bytes) before finishing with it: to be sent again
    DONE = "done"  # it left the writer: written, superseded, or failed (the error is reported)


@dataclass(eq=False)
class InflightSave:
    request: SaveRequest  # with the sequence it was acknowledged with
    writer: int
    route: Route
    done_ref: Any = None  # Ray route: resolves when the save left the writer
    state: SaveState = SaveState.SENT


@dataclass(eq=False)
class Batch:
    """One staged snapshot and its saves (one per key)."""

    staged: Staged
    saves: list[InflightSave] = field(default_factory=list)

    def finished(self) -> bool:
        return all(save.state is SaveState.DONE for save in self.saves)


class InflightSaves:
    """The batches in flight, indexed by (writer, sequence) for the writers' done notices."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: deque[Batch] = deque()
        self._by_sequence: dict[tuple[int, tuple[int, int]], tuple[Batch, InflightSave]] = {}
        self.nbytes = 0

    def add(self, staged: Staged, acknowledged: list[tuple[SaveRequest, int, Enqueued]]) -> Batch:
        """Track a staged snapshot and its acknowledged saves: ``(request, writer, answer)``."""
        batch = Batch(staged)
        with self._lock:
            for request, writer, answer in acknowledged:
                save = InflightSave(replace(request, sequence=answer.ack.sequence), writer, answer.route,
                                    answer.done_ref)  # fmt: skip
                batch.saves.append(save)
                self._by_sequence[(writer, save.request.sequence)] = (batch, save)
            self._batches.append(batch)
            self.nbytes += staged.nbytes
        return batch

    # ---- transitions ---------------------------------------------------------------------------

    def done(self, writer: int, sequence: tuple[int, int]) -> tuple[InflightSave | None, list[Staged]]:
        """SENT (or LOST) -> DONE. Returns the save, and the staged snapshots no save needs any longer
        (to release). A LOST save's notice comes from the incarnation it was just sent again to,
        read before the re-send was recorded: it is done all the same."""
        with self._lock:
            found = self._by_sequence.get((writer, tuple(sequence)))
            if found is None or found[1].state is SaveState.DONE:
                return None, []  # a second notice of one save (sent twice), or of a save not tracked here
            batch, save = found
            save.state = SaveState.DONE
            return save, self._release_if_finished(batch)

    def writer_lost(self, writer: int, route: Route | None = None) -> None:
        """SENT -> LOST for every save writer ``writer`` held (on ``route``, or any)."""
        with self._lock:
            for batch in self._batches:
                for save in batch.saves:
                    if save.writer == writer and save.state is SaveState.SENT and route in (None, save.route):
                        save.state = SaveState.LOST

    def lost_one(self, save: InflightSave) -> None:
        """SENT -> LOST for one save (its writer restarted, or lost its bytes)."""
        with self._lock:
            if save.state is SaveState.SENT:
                save.state = SaveState.LOST

    def resent(self, save: InflightSave, writer: int, answer: Enqueued) -> None:
        """LOST -> SENT: sent again, with its sequence (unless its notice came first)."""
        with self._lock:
            if save.state is SaveState.DONE:
                return
            save.writer, save.route, save.done_ref = writer, answer.route, answer.done_ref
            self._by_sequence[(writer, save.request.sequence)] = (self._batch_of(save), save)
            save.state = SaveState.SENT

    # ---- queries --------------------------------------------------------------------------------

    def lost(self, writer: int | None = None) -> list[tuple[Batch, InflightSave]]:
        with self._lock:
            return [
                (batch, save)
                for batch in self._batches
                for save in batch.saves
                if save.state is SaveState.LOST and writer in (None, save.writer)
            ]

    def on_ray(self) -> list[InflightSave]:
        """SENT saves sent with Ray calls, whose ``done_ref`` says when they are done."""
        with self._lock:
            return [
                save
                for batch in self._batches
                for save in batch.saves
                if save.state is SaveState.SENT and save.route is Route.RAY
            ]

    def oldest(self) -> Batch | None:
        with self._lock:
            return self._batches[0] if self._batches else None

    def keys(self) -> set[str]:
        with self._lock:
            return {save.request.key for batch in self._batches for save in batch.saves}

    def clear(self) -> list[Batch]:
        with self._lock:
            batches, self._batches = list(self._batches), deque()
            self._by_sequence.clear()
            self.nbytes = 0
            return batches

    def _batch_of(self, save: InflightSave) -> Batch:
        return next(batch for batch in self._batches if save in batch.saves)

    def _release_if_finished(self, batch: Batch) -> list[Staged]:
        """Drop ``batch`` once all its saves are done; returns its staged bytes then."""
        if not batch.finished():
            return []
        self._batches.remove(batch)
        self.nbytes -= batch.staged.nbytes
        for save in batch.saves:
            self._by_sequence.pop((save.writer, save.request.sequence), None)
        return [batch.staged]
