"""A writer's sequence counter, shared with the callers on its node through a file in /dev/shm.

Every save of a writer gets a number from this counter: per key, a higher number wins. A caller on
the writer's node takes the number itself, under the counter's lock, before its save call returns,
and then sends the save without waiting for an answer. So the numbers follow the real order of the
calls on the node (a save whose call returned has a lower number than any save issued after it,
from any process), and a save the writer lost can be sent again with the number it had. The writer
takes numbers from the same counter for saves that reach it through Ray calls.

The file also holds the writer's *quiet mark*: the counter's value at a moment when every save
numbered up to it had arrived and was written, with no error held and no lost save awaited. While
the mark equals the counter, a wait for saves issued before it has nothing to wait for, and callers
on the node skip the round trip to the writer (a client restoring its state a round after saving
it, typically). Any new save moves the counter past the mark.

The file is named ``fedckpt-<writer pid>-seq-<id>``, so the sweep of a dead process's staging
segments removes it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import uuid
from collections.abc import Iterator

from fedckpt.runtime.staging import PREFIX, SHM_DIR, create_file, reserve
from fedckpt.storage.atomic import hold_as_owner

_NUMBER = struct.Struct("<Q")
_COUNTER, _QUIET_MARK = 0, _NUMBER.size  # offsets in the file
_SIZE = 2 * _NUMBER.size
_NEVER = (1 << 64) - 1  # a mark no counter reaches: a new incarnation is not quiet until it says so


class SequenceCounter:
    """The counter file of one writer incarnation, mapped."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self._fd = create_file(path) if create else os.open(path, os.O_RDWR)  # no room to create: StagingFull
        try:
            if create:
                hold_as_owner(self._fd)  # the writer's lock: the file is swept once it is gone
                reserve(self._fd, _SIZE)  # a full /dev/shm fails here, not with SIGBUS later
            self._map = mmap.mmap(self._fd, _SIZE)
            if create:
                _NUMBER.pack_into(self._map, _QUIET_MARK, _NEVER)
        except BaseException:
            os.close(self._fd)
            if create:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise

    @classmethod
    def create(cls, directory: str = SHM_DIR) -> SequenceCounter:
        return cls(os.path.join(directory, f"{PREFIX}{os.getpid()}-seq-{uuid.uuid4().hex}"), create=True)

    def take(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive numbers; returns the first."""
        with self._locked():
            (last,) = _NUMBER.unpack_from(self._map, _COUNTER)
            _NUMBER.pack_into(self._map, _COUNTER, last + count)
        return last + 1

    def mark_quiet(self, arrived: int) -> None:
        """(Writer) Nothing is pending, held or awaited, and ``arrived`` saves numbered from this
        counter reached the writer: if that is every number taken, set the quiet mark."""
        with self._locked():
            (last,) = _NUMBER.unpack_from(self._map, _COUNTER)
            if last == arrived:
                _NUMBER.pack_into(self._map, _QUIET_MARK, last)

    def quiet(self) -> bool:
        """(Caller) Whether every save numbered so far is written and nothing is held or awaited."""
        with self._locked():
            counter, mark = _NUMBER.unpack_from(self._map, _COUNTER)[0], _NUMBER.unpack_from(self._map, _QUIET_MARK)[0]
        return counter == mark

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self, remove: bool = False) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
