"""Identical bytes written once: a checkpoint whose content equals a version already on storage is
hard-linked to that version instead of written again.

The typical cases: every client's post-aggregation checkpoint of one global model, or a server's
latest and best. A writer hashes a model file's bytes (header and staged data) before writing, so
the hash names the file's content; the :class:`ContentIndex` names a published checkpoint that had
that content. The index may be stale: :func:`link_identical` trusts only the candidate's manifest
entry, read under its publishing lock, where entry and file are a pair.

Hard links are safe here because fedckpt never writes into a published file: every version is a
new file renamed into place, so a rename replaces one name's inode and leaves the inode that other
names share untouched. Each name still loads on its own, ``fedckpt verify`` checks each, and
deleting one leaves the others intact.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from fedckpt.storage import manifest
from fedckpt.storage.atomic import claim_temp
from fedckpt.storage.paths import Location

# Content index entries are shared by the writers of one node through tmpfs files: each writer of a
# pool owns a share of the keys, and one global model saved by ten clients lands on all of them.
INDEX_DIR = f"/dev/shm/.fedckpt-content-{os.getuid()}" if hasattr(os, "getuid") else ""
INDEX_CAPACITY = 1024  # entries kept; the oldest go first
PRUNE_EVERY = 256  # records between two prunes
# How long a save waits for another thread of this process writing the same content, to link to it.
CLAIM_WAIT_SECONDS = 60.0


class ContentIndex:
    """Checksum -> the path of a checkpoint published with that content (a hint, checked on use)."""

    def __init__(self, directory: str | None = INDEX_DIR, capacity: int = INDEX_CAPACITY) -> None:
        self.capacity = capacity
        self.directory = directory if directory and _usable_dir(directory) else None
        self._memory: OrderedDict[str, str] = OrderedDict()  # without a shared directory
        self._lock = threading.Lock()
        self._records = 0
        self._writing: dict[str, threading.Event] = {}  # content being written by a thread of this process
        if self.directory is not None:  # short-lived writers (one per run) never reach PRUNE_EVERY
            self._prune()

    @contextlib.contextmanager
    def writing(self, checksum: str) -> Iterator[str | None]:
        """Around writing a file with content ``checksum``: yields a checkpoint to link to, when one
        is known or another thread of this process just wrote it (this waits for that thread, so
        that identical saves arriving together, as every client's copy of a new global model does,
        are written once); else None, and the content counts as being written until the block ends."""
        candidate = self.candidate(checksum)
        if candidate is not None:
            yield candidate
            return
        with self._lock:
            other = self._writing.get(checksum)
            if other is None:
                done = self._writing[checksum] = threading.Event()
        if other is not None:
            other.wait(CLAIM_WAIT_SECONDS)
            yield self.candidate(checksum)
            return
        try:
            yield None
        finally:
            with self._lock:
                del self._writing[checksum]
            done.set()

    def candidate(self, checksum: str) -> str | None:
        if self.directory is None:
            with self._lock:
                return self._memory.get(checksum)
        try:
            with open(self._entry(checksum), encoding="utf-8") as file:
                return file.read() or None
        except OSError:
            return None

    def record(self, checksum: str, path: str) -> None:
        """``path`` now holds content ``checksum`` (its version was just published)."""
        if self.directory is None:
            with self._lock:
                self._memory[checksum] = path
                self._memory.move_to_end(checksum)
                while len(self._memory) > self.capacity:
                    self._memory.popitem(last=False)
            return
        entry = self._entry(checksum)
        temp = f"{entry}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(temp, "w", encoding="utf-8") as file:
                file.write(path)
            os.replace(temp, entry)
        except OSError:  # a full tmpfs: deduplication is an optimization, never a failure
            with contextlib.suppress(OSError):
                os.remove(temp)
            return
        with self._lock:
            self._records += 1
            prune = self._records % PRUNE_EVERY == 0
        if prune:
            self._prune()

    def _entry(self, checksum: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, checksum.replace(":", "-"))

    def _prune(self) -> None:
        assert self.directory is not None
        entries = []
        with contextlib.suppress(OSError):
            for item in os.scandir(self.directory):
                with contextlib.suppress(OSError):
                    entries.append((item.stat().st_mtime, item.path))
        stale_temps = time.time() - 60
        for _, path in sorted(entries, reverse=True)[self.capacity :]:
            with contextlib.suppress(OSError):
                os.remove(path)
        for mtime, path in entries:
            if path.endswith(".tmp") and mtime < stale_temps:
                with contextlib.suppress(OSError):
                    os.remove(path)


def _usable_dir(directory: str) -> bool:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.access(directory, os.W_OK)
    except OSError:
        return False


def link_identical(candidate: str, checksum: str, target: str) -> bool:
    """Hard-link ``candidate`` at ``target`` if its current version has content ``checksum``.

    Checked under the candidate's publishing lock, where its manifest entry describes the file
    beside it; the link is made under the same lock, so it names exactly that version. False (and
    nothing made) when the candidate changed, is gone, or cannot be linked (another file system, a
    file system without hard links, an object store).
    """
    if Location.of(candidate).is_url:  # the node's content index names checkpoints on object stores too
        return False
    with manifest.publishing_lock(candidate):
        entry = manifest.read_entry_locked(candidate)
        if entry is None or entry.checksum != checksum:
            return False
        try:
            if os.stat(candidate).st_size != entry.bytes:  # replaced behind fedckpt's back
                return False
            claim_temp(target, link_from=candidate)
        except OSError:
            return False
    return True
