"""A restarted writer's bookkeeping of the saves its predecessor acknowledged and lost.

A writer that dies loses the saves queued in its memory. Most of them it finds again at once: their
tickets in the staging segments of its node, and of the nodes whose writers it asks
(:mod:`~fedckpt.runtime.tickets`), which it queues before it answers any flush. A save staged in
Ray's object store (a caller without ``/dev/shm``) has no ticket: its caller's outstanding
``wait_saved`` call, which Ray delivers again to the restarted incarnation, names it. The writer
answers UNKNOWN (the caller sends the save again) and remembers the save here, so that a flush or
read from any process waits for it too, until it arrives, a newer save of its key is on storage,
or its grace period runs out (its caller died too): then the save's key holds a ``SaveLostError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fedckpt.errors import SaveLostError

log = logging.getLogger("fedckpt.writer")

# How long a restarted writer waits for a lost save to be sent again before flushes and reads stop
# waiting for it (its caller presumably died too) and report it as lost.
RESEND_GRACE_SECONDS = 60.0


class LostSaves:
    """Saves an earlier incarnation lost: key -> sequence -> a future resolved once the save was
    sent again and left memory, was replaced on disk by a newer save of its key, or its grace
    period ran out."""

    def __init__(
        self, restarted: bool, writer_name: str, on_give_up: Callable[[str, BaseException], None] | None = None
    ) -> None:
        self.restarted = restarted
        self.on_give_up = on_give_up  # gets the key and the error to report for it
        self.writer_name = writer_name
        self.grace_seconds = RESEND_GRACE_SECONDS
        self.awaited: dict[str, dict[tuple[int, int], asyncio.Future]] = {}

    def expect(self, key: str, sequence: tuple[int, int]) -> None:
        """Remember a lost save until its caller sends it again (bounded by the grace period)."""
        awaited = self.awaited.setdefault(key, {})
        if sequence in awaited:
            return
        loop = asyncio.get_running_loop()
        awaited[sequence] = loop.create_future()
        loop.call_later(self.grace_seconds, self._give_up, key, sequence)

    def arrived(self, key: str, sequence: tuple[int, int]) -> asyncio.Future | None:
        """A save was sent again: forget it here; returns its future (not resolved yet) if it was awaited."""
        awaited = self.awaited.get(key, {})
        future = awaited.pop(sequence, None)
        if not awaited:
            self.awaited.pop(key, None)
        return future

    def superseded_on_disk(self, key: str, sequence: tuple[int, int]) -> None:
        """A save of ``key`` is on disk: lost saves older than it need not be waited for."""
        for older in [awaited for awaited in self.awaited.get(key, {}) if awaited < sequence]:
            future = self.arrived(key, older)
            if future is not None and not future.done():
                future.set_result(None)

    def futures(self, keys: list[str]) -> list[asyncio.Future]:
        return [future for key in keys for future in self.awaited.get(key, {}).values()]

    def keys(self) -> set[str]:
        return set(self.awaited)

    def count(self) -> int:
        return sum(len(sequences) for sequences in self.awaited.values())

    def _give_up(self, key: str, sequence: tuple[int, int]) -> None:
        future = self.arrived(key, sequence)
        if future is None or future.done():
            return
        error = SaveLostError(
            f"a save of {key} (sequence {sequence}) was acknowledged by an earlier incarnation of "
            f"{self.writer_name}, which died before writing it, and was not sent again within "
            f"{self.grace_seconds:.0f} s (its caller presumably died too): the checkpoint on storage "
            "stays at its last written version"
        )
        log.error("fedckpt: %s", error)
        if self.on_give_up is not None:
            self.on_give_up(key, error)
        future.set_result(None)
