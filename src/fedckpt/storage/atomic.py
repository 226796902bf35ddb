"""Atomic, durable local files: write a temp file, fsync, rename over the target, fsync the directory.

Local files only: the helpers that name a checkpoint refuse a URL with a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from typing import TypeVar

from fedckpt.storage.paths import Location, temp_file_owner, temp_owner, temp_path

T = TypeVar("T")

_swept_dirs: set[str] = set()  # temp directories this process already cleaned


def make_directory(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, in one system call where the directory exists (a writer's
    every save after a checkpoint's first): a ``FileExistsError`` where a file has its name."""
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)


def read_small_file(path: str) -> bytes:
    """A small file's bytes, with none of ``open()``'s buffering set-up (a manifest entry, an index
    entry: read on every save)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_small_file(path: str, data: bytes, flags: int = os.O_TRUNC) -> None:
    """Write ``data`` as the whole of file ``path``, with none of ``open()``'s set-up. ``flags`` are
    added to ``os.O_WRONLY``: by default the file exists and is emptied first (``os.O_CREAT`` makes
    it where it does not)."""
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """fsync a file's data, or a directory's entries (what makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temp files this process writes: path -> a descriptor holding a shared flock on the file, from
# its creation until it is published or removed. The lock, not the PID in its name, is what tells
# another process that its writer is alive: a PID means nothing across PID namespaces (containers),
# and the kernel drops the lock when its holder dies, however it dies.
_owned: dict[str, int] = {}
_owned_lock = threading.Lock()
CLAIM_SUFFIX = ".claim"


def claim_temp(temp: str, link_from: str | None = None) -> None:
    """Create ``temp`` (empty, or a hard link to ``link_from``) already locked by this process: it
    is made and locked under a side name, then renamed, so it never shows unlocked under its name."""
    side = temp + CLAIM_SUFFIX
    if link_from is not None:
        os.link(link_from, side)
        fd = os.open(side, os.O_RDONLY)
    else:
        fd = os.open(side, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        hold_as_owner(fd)
        os.rename(side, temp)
    except BaseException:
        os.close(fd)
        remove_quietly(side)
        raise
    with _owned_lock:
        _owned[temp] = fd


def release_temp(temp: str) -> None:
    with _owned_lock:
        fd = _owned.pop(temp, None)
    if fd is not None:
        os.close(fd)


def discard_temp(temp: str) -> None:
    """Remove a temp file of this process (it is not published)."""
    remove_quietly(temp)
    release_temp(temp)


def write_durable_temp(final_path: str, write: Callable[[str], T], claim: bool = True) -> tuple[str, T]:
    """Run ``write(temp)`` for a new temp file beside ``final_path`` and fsync it.

    Returns the temp path and what ``write`` returned. The temp file is created and locked first
    (unless ``claim=False``: then ``write`` calls :func:`claim_temp` itself), and removed if
    anything fails. A ``ValueError`` for a URL.
    """
    Location.of(final_path).local_path("fedckpt.storage.atomic.write_durable_temp")
    temp = temp_path(final_path)
    make_directory(os.path.dirname(temp))
    if os.path.dirname(temp) not in _swept_dirs:
        remove_stale_temps(os.path.dirname(temp))
        _swept_dirs.add(os.path.dirname(temp))
    try:
        if claim:
            claim_temp(temp)
        result = write(temp)
        fsync_path(temp)
    except BaseException:
        discard_temp(temp)
        raise
    return temp, result


def publish(temp: str, final_path: str) -> None:
    """Atomically move a durable temp file into place and make the rename durable (a ``ValueError``
    for a URL)."""
    final_path = Location.of(final_path).local_path("fedckpt.storage.atomic.publish")
    os.replace(temp, final_path)
    if os.path.lexists(temp):  # a hard link to the file already in place: rename leaves both names
        os.remove(temp)
    release_temp(temp)
    fsync_path(os.path.dirname(final_path) or ".")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def remove_stale_temps(temp_dir: str) -> list[str]:
    """Remove the temp files in ``temp_dir`` left by writers on this host that no longer run.

    A writer killed mid-write (SIGKILL, a lost node) leaves its temp file behind; the checkpoint
    itself is untouched. A writer that runs holds a lock on each of its temp files
    (:func:`claim_temp`); files of other hosts (whose locks a shared file system may not show) and
    unknown names are kept.
    """
    host = temp_owner().rpartition("-")[0]
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(temp_dir):
            owner = temp_file_owner(name)
            path = os.path.join(temp_dir, name)
            if owner is not None and owner[0] == host and not owner_alive(path):
                remove_quietly(path)
                removed.append(name)
    return removed


def hold_as_owner(fd: int) -> None:
    """Hold a shared flock on a file this process made, for as long as ``fd`` is open: the kernel
    drops it when the process dies, in whatever PID namespace it ran (see :func:`owner_alive`)."""
    with contextlib.suppress(OSError):  # no flock here: owner_alive then counts the file as alive
        fcntl.flock(fd, fcntl.LOCK_SH)


def owner_alive(path: str) -> bool:
    """Whether a live process holds the lock on ``path`` (its owner). A file system without flock
    counts as alive: nothing is removed there; so does a file this process may not open (another
    user's) or a symbolic link. Never waits (a FIFO of that name is opened without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return True  # gone already: nothing to remove
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):  # not ours to judge
            return True
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by its owner; anything else: no locks to tell by
        return True
    finally:
        os.close(fd)  # drops the probe's lock
    return False
