"""A sequential file writer that bypasses the page cache (O_DIRECT), checksumming as it writes if asked.

Why: on the machines this runs on, a buffered ``write`` of checkpoint bytes costs about one second
of kernel CPU per GB (the copy into the page cache and its writeback), and that CPU is taken from
training. With O_DIRECT the disk reads the bytes straight from the caller's staging memory: about a
tenth of the CPU, and a durable checkpoint does not fill the page cache.

O_DIRECT needs block-aligned file offsets, lengths and memory. Aligned spans of the input (the
data section of a model checkpoint, which is page-aligned in staging and padded to a block in the
file) go to disk as they are; everything else passes through a small aligned bounce buffer. The
last partial block is written padded and the file truncated to its length. Where the file system
refuses O_DIRECT (tmpfs, some network file systems) the writer falls back to buffered writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from typing import Any

import numpy as np

from fedckpt.storage.checksum import RunningChecksum

BLOCK = 4096  # alignment that satisfies O_DIRECT on common devices and file systems
BOUNCE_BYTES = 8 << 20  # a multiple of BLOCK
DIRECT_CHUNK = 64 << 20  # a multiple of BLOCK; bounds one write call
CHECKSUM_CHUNK = 8 << 20


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class HashingFile:
    """A new binary file written front to back; ``close()`` returns the checksum of what was written
    (None with ``checksum=False``, for bytes whose checksum is known already)."""

    def __init__(self, path: str, direct: bool = True, checksum: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as error:
            if not self.direct or error.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        self.checksum = RunningChecksum() if checksum else None
        self.size = 0
        self.bounce = mmap.mmap(-1, BOUNCE_BYTES) if self.direct else None  # anonymous maps are page-aligned
        self.filled = 0
        self.failed: OSError | None = None

    def write(self, data: Any) -> int:
        """Append ``data``. After a failed write (disk full, I/O error) later writes are dropped: the
        first error is the one raised."""
        view = memoryview(data).cast("B")
        if self.failed is not None:
            return len(view)
        if self.checksum is not None:
            for start in range(0, len(view), CHECKSUM_CHUNK):
                self.checksum.update(view[start : start + CHECKSUM_CHUNK])
        try:
            if self.direct:
                self._write_direct(view)
            else:
                self._write_all(view)
        except OSError as error:
            self.failed = error
            raise
        self.size += len(view)
        return len(view)

    def close(self) -> str | None:
        """Write what is buffered, set the file's length, close it; returns the checksum (``xxh3:<hex>``)."""
        try:
            if self.direct and self.filled and self.failed is None:
                padded = -(-self.filled // BLOCK) * BLOCK
                assert self.bounce is not None
                self.bounce[self.filled : padded] = bytes(padded - self.filled)
                self.filled = padded
                self._drain()
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            if self.bounce is not None:
                with contextlib.suppress(BufferError):  # a view held by an exception's frames: GC frees it
                    self.bounce.close()
        return None if self.checksum is None else self.checksum.value()

    def _write_direct(self, view: memoryview) -> None:
        base, position, length = _address(view), 0, len(view)
        while position < length and self.direct:
            aligned = (base + position) % BLOCK == 0 and length - position >= BLOCK
            if aligned and self.filled % BLOCK == 0:
                self._drain()
                span = min((length - position) // BLOCK * BLOCK, DIRECT_CHUNK)
                self._write_all(view[position : position + span])
                position += span
                continue
            assert self.bounce is not None
            take = min(BOUNCE_BYTES - self.filled, length - position)
            self.bounce[self.filled : self.filled + take] = view[position : position + take]
            self.filled += take
            position += take
            if self.filled == BOUNCE_BYTES:
                self._drain()
        if position < length:  # fell back to buffered writes part way
            self._write_all(view[position:])

    def _drain(self) -> None:
        """Write the bounce buffer's whole blocks (it holds only whole blocks when called)."""
        if self.filled:
            assert self.bounce is not None
            with memoryview(self.bounce) as bounce:
                self._write_all(bounce[: self.filled])
            self.filled = 0

    def _write_all(self, view: memoryview) -> None:
        written = 0
        while written < len(view):
            try:
                written += os.write(self.fd, view[written:])
            except OSError as error:
                if not self.direct or error.errno != errno.EINVAL:
                    raise
                self._stop_direct()  # the file system took the flag at open but not these writes

    def _stop_direct(self) -> None:
        """Continue with buffered writes (the failed write is retried; the bounce buffer is empty or
        is what was being written)."""
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
