"""A writer's sequence counter, shared with the callers on its node through a file in /dev/shm.

Every save of a writer gets a number from this counter: per key, a higher number wins. A caller on
the writer's node takes the number itself, under the counter's lock, before its save call returns,
and then sends the save without waiting for an answer. So the numbers follow the real order of the
calls on the node (a save whose call returned has a lower number than any save issued after it,
from any process), and a save the writer lost can be sent again with the number it had. The writer
takes numbers from the same counter for saves that reach it through Ray calls.

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

from fedckpt.runtime.staging import PREFIX, SHM_DIR

_NUMBER = struct.Struct("<Q")


class SequenceCounter:
    """The counter file of one writer incarnation, mapped."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(self._fd, _NUMBER.size)
            self._map = mmap.mmap(self._fd, _NUMBER.size)
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(cls, directory: str = SHM_DIR) -> SequenceCounter:
        return cls(os.path.join(directory, f"{PREFIX}{os.getpid()}-seq-{uuid.uuid4().hex}"), create=True)

    def take(self, count: int = 1) -> int:
        """Reserve ``count`` consecutive numbers; returns the first."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            (last,) = _NUMBER.unpack_from(self._map)
            _NUMBER.pack_into(self._map, 0, last + count)
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        return last + 1

    def close(self, remove: bool = False) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
