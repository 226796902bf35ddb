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
on the node skip the round trip to the writer. Any new save moves the counter past the mark.

The same holds per *bucket* of keys (a hash of the key picks one of ``BUCKETS``): the saves of the
bucket's keys numbered so far, and the writer's mark of those that arrived while none of the
bucket's keys had a save pending or an error held. A wait for some keys skips the round trip when
each key's bucket is quiet, though the writer is busy with other keys: a Flower client restoring
its state a round after saving it, while the writer writes other clients' saves.

Callers take numbers and read the marks under the file's lock. The writer sets a mark after each
save it finishes *without* taking it: the writer runs at a lower priority than training, and a
writer descheduled while holding the lock would stall every caller on the node for milliseconds.
That needs no lock because each field is one aligned 8-byte word that is stored and loaded whole
(``struct``'s native format copies it with one machine move: single-copy atomic on x86-64 and
AArch64), and a mark is a count the writer saw taken with nothing pending: a caller that reads a
mark equal to the count it reads sees every save numbered so far written, and a number taken
meanwhile only makes the two differ. The writer's rare marks (ready after a restart, a bucket
unmarked for an error or a lost save) still take the lock, which orders them before the callers'
next reads.

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
import zlib

from fedckpt.runtime.staging import PREFIX, SHM_DIR, create_file, reserve
from fedckpt.storage.atomic import hold_as_owner

_NUMBER = struct.Struct("Q")  # native: one aligned word, stored and loaded whole (see above)
BUCKETS = 4096
_COUNTER, _QUIET_MARK, _READY = 0, _NUMBER.size, 2 * _NUMBER.size  # offsets in the file
_BUCKETS_AT = 3 * _NUMBER.size  # then per bucket: saves numbered, the writer's quiet mark
_SIZE = _BUCKETS_AT + BUCKETS * 2 * _NUMBER.size
_NEVER = (1 << 64) - 1  # a mark no counter reaches: a new incarnation is not quiet until it says so


def bucket_of(key: str) -> int:
    """The bucket of ``key``: the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32(key.encode()) % BUCKETS


def _taken_at(bucket: int) -> int:
    return _BUCKETS_AT + bucket * 2 * _NUMBER.size


def _mark_at(bucket: int) -> int:
    return _taken_at(bucket) + _NUMBER.size


class _FileLock:
    """The counter file's lock, shared by every process of the node (``lockf``); a plain context
    manager: it is taken on every save."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class SequenceCounter:
    """The counter file of one writer incarnation, mapped."""

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        self._fd = create_file(path) if create else os.open(path, os.O_RDWR)  # no room to create: StagingFull
        self._lock = _FileLock(self._fd)
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

    def take(self, keys: list[str]) -> int:
        """Reserve a number for each save of ``keys`` (consecutive; returns the first), counting it in
        its key's bucket."""
        with self._lock:
            (last,) = _NUMBER.unpack_from(self._map, _COUNTER)
            _NUMBER.pack_into(self._map, _COUNTER, last + len(keys))
            for key in keys:
                at = _taken_at(bucket_of(key))
                _NUMBER.pack_into(self._map, at, _NUMBER.unpack_from(self._map, at)[0] + 1)
        return last + 1

    def mark_quiet(self, arrived: int) -> None:
        """(Writer) Nothing is pending, held or awaited, and ``arrived`` saves numbered from this
        counter reached the writer: if that is every number taken, set the quiet mark (no lock: see above)."""
        (last,) = _NUMBER.unpack_from(self._map, _COUNTER)
        if last == arrived:
            _NUMBER.pack_into(self._map, _QUIET_MARK, last)

    def mark_ready(self) -> None:
        """(Writer) Recovered, with no lost save awaited: bucket marks may now say a bucket is quiet."""
        with self._lock:
            _NUMBER.pack_into(self._map, _READY, 1)

    def mark_bucket_quiet(self, bucket: int, arrived: int) -> None:
        """(Writer) No key of ``bucket`` has a save pending or an error held, and ``arrived`` saves of
        its keys reached the writer: if that is every number taken for them, mark the bucket quiet (no
        lock: see above)."""
        if _NUMBER.unpack_from(self._map, _taken_at(bucket))[0] == arrived:
            _NUMBER.pack_into(self._map, _mark_at(bucket), arrived)

    def unmark_bucket(self, bucket: int) -> None:
        """(Writer) A key of ``bucket`` has something to wait for that took no number (an error held for
        it, a lost save awaited): the bucket is not quiet until marked again."""
        with self._lock:
            _NUMBER.pack_into(self._map, _mark_at(bucket), _NEVER)

    def keys_quiet(self, keys: list[str]) -> bool:
        """(Caller) Whether every save of ``keys`` numbered so far is written with no error held (their
        buckets are quiet: other keys of a bucket only make it look busy)."""
        with self._lock:
            if _NUMBER.unpack_from(self._map, _READY)[0] != 1:
                return False
            for bucket in {bucket_of(key) for key in keys}:
                taken = _NUMBER.unpack_from(self._map, _taken_at(bucket))[0]
                if taken != _NUMBER.unpack_from(self._map, _mark_at(bucket))[0]:
                    return False
        return True

    def quiet(self) -> bool:
        """(Caller) Whether every save numbered so far is written and nothing is held or awaited."""
        with self._lock:
            counter, mark = _NUMBER.unpack_from(self._map, _COUNTER)[0], _NUMBER.unpack_from(self._map, _QUIET_MARK)[0]
        return counter == mark

    def close(self, remove: bool = False) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
