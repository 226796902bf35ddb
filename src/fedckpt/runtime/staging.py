"""Reused shared-memory staging buffers: the one copy a save makes, into memory already warm.

A snapshot is copied into a staging segment (a file in ``/dev/shm`` mapped by the caller), laid out
exactly as the checkpoint's data section; the writer actor on the same node maps the same file and
writes it out. A segment is reused once its save left the writer, so after the first saves the copy
runs at memcpy speed instead of paying a page fault per 4 KiB, as fresh allocations (``ray.put``
into a new object) do. Segments outlive a crashed caller, so a writer can finish what was
acknowledged; whoever finds a segment whose creator died removes it.

A caller tells the writer of a save only once its copy is complete, so a writer never reads a
segment still being filled.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedckpt.runtime import threads
from fedckpt.storage.atomic import hold_as_owner, owner_alive

log = logging.getLogger("fedckpt")

SHM_DIR = "/dev/shm"
PREFIX = "fedckpt-"


@dataclass(eq=False)
class Segment:
    """One mapped staging file; ``owner_fd`` holds a shared flock on it for as long as it exists,
    which is how other processes tell that its creator is alive (see :func:`owner_alive`)."""

    path: str
    size: int
    buffer: mmap.mmap
    owner_fd: int
    array: np.ndarray = field(init=False)  # a uint8 view of the whole mapping
    # Run before the mapping goes (its registration with CUDA is undone there: runtime/cuda.py).
    before_close: list[Callable[[], None]] = field(default_factory=list)
    marked_used: float = field(default_factory=time.monotonic)  # when its file's mtime was last set

    def __post_init__(self) -> None:
        self.array = np.frombuffer(self.buffer, dtype=np.uint8)

    def mark_used(self) -> None:
        """Set the file's mtime, its last use (see SEGMENT_GRACE_SECONDS); at most once a second,
        which the grace period leaves room for: small saves reuse a segment many times a second."""
        now = time.monotonic()
        if now - self.marked_used >= USE_MARK_SECONDS:
            os.utime(self.path)
            self.marked_used = now

    def close(self) -> None:
        finalizers, self.before_close = self.before_close, []
        for finalize in finalizers:
            try:
                finalize()
            except Exception as error:  # the mapping goes all the same
                log.warning("fedckpt: closing staging segment %s: %s: %s", self.path, type(error).__name__, error)
        self.__dict__.pop("array", None)
        with contextlib.suppress(BufferError):  # a view still alive elsewhere: the GC unmaps it later
            self.buffer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.owner_fd)


def shared_memory_available(directory: str = SHM_DIR) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def creator_pid(path: str) -> int | None:
    """The pid encoded in a segment's name, ``fedckpt-<pid>-<id>``."""
    name = os.path.basename(path)
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


# A segment whose creator died is kept this long after its last use: a save its creator sent just
# before dying may still be on its way to the writer, which maps the segment when the save arrives.
SEGMENT_GRACE_SECONDS = 30.0
USE_MARK_SECONDS = 1.0  # how stale a segment's mtime may be as a mark of its last use


def remove_orphans(
    directory: str = SHM_DIR, settle_seconds: float = 0.0, grace_seconds: float = SEGMENT_GRACE_SECONDS
) -> int:
    """Remove segments whose creator process is gone (a caller killed before it cleaned up) and that
    were last used more than ``grace_seconds`` ago (0 once no writer can still be reading: Ray is down).

    With ``settle_seconds``, keep sweeping that long while other processes' segments remain: for
    a driver that just shut Ray down, whose workers (Flower's ClientApp actors) are still exiting.
    """
    removed = 0
    deadline = time.monotonic() + settle_seconds
    while True:
        remaining = 0
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            names = []
        for name in names:
            pid = creator_pid(name)
            if pid is None or pid == os.getpid():
                continue
            path = os.path.join(directory, name)
            if not _own_file(path):  # another user's (on a shared node), not a file, or gone: never touched
                continue
            if owner_alive(path):  # its creator holds its lock (a PID means nothing across namespaces)
                remaining += 1
                continue
            try:
                if grace_seconds and time.time() - os.lstat(path).st_mtime < grace_seconds:
                    continue
                os.unlink(path)
                removed += 1
            except (FileNotFoundError, PermissionError):  # removed meanwhile; or not ours to remove after all
                continue
        if remaining == 0 or time.monotonic() >= deadline:
            return removed
        time.sleep(0.05)


def _own_file(path: str) -> bool:
    """Whether ``path`` is a regular file of this user (not followed if a symbolic link)."""
    try:
        status = os.lstat(path)
    except (FileNotFoundError, PermissionError):
        return False
    return stat.S_ISREG(status.st_mode) and status.st_uid == os.getuid()


SEGMENT_GRANULARITY = 2 << 20


class StagingFull(OSError):
    """``/dev/shm`` has no room for a staging segment (Docker's default is 64 MB)."""


class StagingArena:
    """This process's staging segments: each is either free or holds one save in flight.

    Free segments are kept for reuse while the total stays within ``max_bytes``; a larger need, or
    a full ``/dev/shm``, drops free segments first. Every segment's memory is reserved when it is
    made, so a full ``/dev/shm`` is a :class:`StagingFull` error there, never a SIGBUS during a copy.
    """

    def __init__(self, max_bytes: int, directory: str = SHM_DIR) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self._free: list[Segment] = []
        self._busy: set[Segment] = set()
        self._lock = threading.Lock()
        self._made_ready = threading.Condition(self._lock)
        self._ready_target = 0  # small segments kept free ahead (keep_ready), refilled in the background
        self._refill = threading.Event()
        self._refiller: threading.Thread | None = None
        self._closed = False
        remove_orphans(directory)

    def total_bytes(self) -> int:
        return sum(segment.size for segment in self._free) + sum(segment.size for segment in self._busy)

    def acquire(self, nbytes: int, prefer: Callable[[Segment], bool] | None = None) -> Segment:
        """A segment for ``nbytes`` of data: the smallest free one that fits (among those ``prefer``
        says yes to, if any: the GPU path prefers segments registered with CUDA already), or a new one."""
        with self._lock:
            fitting = [segment for segment in self._free if segment.size >= nbytes]
            if prefer is not None:
                fitting = [segment for segment in fitting if prefer(segment)] or fitting
            if fitting:
                segment = min(fitting, key=lambda candidate: candidate.size)
                self._free.remove(segment)
                segment.mark_used()
            else:
                while self._free and self.total_bytes() + nbytes > self.max_bytes:
                    self._free.pop(0).close()
                while True:
                    try:
                        segment = self._create(nbytes)
                        break
                    except StagingFull:
                        if not self._free:
                            raise
                        self._free.pop(0).close()  # room for this one, then try again
            self._busy.add(segment)
            if self._ready_count() < self._ready_target:
                self._refill.set()  # the next small save finds one ready, made off the caller's path
            return segment

    def make_ready(self, count: int) -> None:
        """Have ``count`` free segments of the smallest size ready (a process's first small saves then
        map no memory); none is made when ``/dev/shm`` has no room for it. Each is made outside the
        lock: saves meanwhile take and release segments without waiting for it."""
        while True:
            with self._lock:
                if self._closed or self._ready_count() >= count:
                    return
                if self.total_bytes() + SEGMENT_GRANULARITY > self.max_bytes:
                    return
            try:
                segment = self._create(SEGMENT_GRANULARITY // 2)
            except StagingFull:
                return
            with self._lock:
                if self._closed or self.total_bytes() + segment.size > self.max_bytes:
                    segment.close()
                    return
                self._free.append(segment)
                self._made_ready.notify_all()

    def wait_ready(self, count: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until ``count`` small segments are free; whether they are."""
        with self._made_ready:
            return self._made_ready.wait_for(lambda: self._ready_count() >= count, timeout)

    def keep_ready(self, count: int) -> None:
        """:meth:`make_ready` now, and from then on whenever a save takes one of those segments: a
        background thread makes the next one while the caller goes on (a Flower client's saves then
        map no memory even when the writer falls behind and more of them are in flight)."""
        self.make_ready(count)
        with self._lock:
            self._ready_target = count
            if self._refiller is None and not self._closed:
                threads.wake_on_stop(self._refill.set)
                self._refiller = threads.start("fedckpt-staging", self._refill_loop)

    def _refill_loop(self) -> None:
        while True:
            self._refill.wait()
            self._refill.clear()
            if self._closed or threads.stopping.is_set():
                return
            self.make_ready(self._ready_target)

    def _ready_count(self) -> int:
        return sum(1 for segment in self._free if segment.size == SEGMENT_GRANULARITY)

    def has_free(self, nbytes: int) -> bool:
        return any(segment.size >= nbytes for segment in self._free)

    def release(self, segment: Segment) -> None:
        """``segment``'s save left the writer: keep it for reuse, within the budget."""
        with self._lock:
            self._busy.discard(segment)
            self._free.append(segment)
            self._made_ready.notify_all()
            while self._free and self.total_bytes() > self.max_bytes:
                self._free.pop(0).close()

    def close(self) -> None:
        """Unmap and remove every segment (busy ones too: call after a flush)."""
        with self._lock:
            self._closed = True
            self._refill.set()  # its thread returns
            for segment in [*self._free, *self._busy]:
                segment.close()
            self._free.clear()
            self._busy.clear()

    def _create(self, nbytes: int) -> Segment:
        # Room to spare, so that saves whose sizes differ a little (a model and its optimizer state,
        # a model with one buffer more) reuse each other's segments instead of mapping new memory.
        size = -(-(nbytes + nbytes // 64 + 1) // SEGMENT_GRANULARITY) * SEGMENT_GRANULARITY
        path = os.path.join(self.directory, f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        fd = create_file(path)
        try:
            hold_as_owner(fd)
            reserve(fd, size)
            # Fault the pages in now, in one go, rather than one by one during the first copy.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            buffer = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            os.close(fd)
            raise
        return Segment(path, size, buffer, fd)


# What tmpfs answers when it has no room: no memory or inodes left (ENOSPC, ENOMEM), or a quota reached.
NO_ROOM = (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT)


def create_file(path: str) -> int:
    """Create the shared-memory file ``path`` (which must not exist), open read-write. Raises
    :class:`StagingFull` when there is no room for another file: tmpfs refuses it at ``open`` when
    it has no inode left, before any memory is reserved."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        if error.errno in NO_ROOM:
            why = f"{os.strerror(error.errno)}: no memory or no inode left"
            message = f"{os.path.dirname(path)} has no room for another file ({why})"
            raise StagingFull(error.errno, message) from error
        raise


def reserve(fd: int, size: int) -> None:
    """Give the shared-memory file ``fd`` ``size`` bytes of memory now. ``ftruncate`` alone reserves
    nothing on tmpfs: writing into a mapping of it past what ``/dev/shm`` has left kills the
    process with SIGBUS. Raises :class:`StagingFull` when there is no room."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno in NO_ROOM:
            raise StagingFull(error.errno, f"/dev/shm has no room for {size} bytes of staging memory") from error
        raise


class SegmentReader:
    """The writer's side: read-only mappings of callers' segments, kept while they are in use."""

    def __init__(self, max_idle_seconds: float = 60.0) -> None:
        self.max_idle_seconds = max_idle_seconds
        self._maps: dict[str, tuple[mmap.mmap, float]] = {}  # path -> (mapping, last use)
        self._last_sweep = time.monotonic()
        remove_orphans()

    def open(self, path: str) -> memoryview:
        """The whole of segment ``path``, mapped: the view keeps it readable even after the
        segment is removed (its creator died and another process swept it up). A segment's name
        is never reused (it ends in a random id), so a mapping is kept by name."""
        cached = self._maps.get(path)
        if cached is None:
            with open(path, "rb") as file:
                mapping = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
        else:
            mapping = cached[0]
        self._maps[path] = (mapping, time.monotonic())
        return memoryview(mapping)

    def finished(self, path: str) -> None:
        """After a save from ``path``: unmap idle segments, and now and then remove those of dead
        creators (another save may still be on its way from one: see SEGMENT_GRACE_SECONDS)."""
        if not owner_alive(path):
            self._close(path)
        now = time.monotonic()
        for idle in [p for p, (_, used) in self._maps.items() if now - used > self.max_idle_seconds]:
            self._close(idle)
        if now - self._last_sweep > self.max_idle_seconds:
            self._last_sweep = now
            remove_orphans()

    def _close(self, path: str) -> None:
        mapping, _ = self._maps.pop(path)
        with contextlib.suppress(BufferError):  # still viewed: the GC unmaps it later
            mapping.close()
