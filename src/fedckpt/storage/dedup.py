"""Identical bytes written once: a checkpoint whose content equals a version already on storage is
hard-linked to that version instead of written again.

The typical cases: every client's post-aggregation checkpoint of one global model, or a server's
latest and best. A writer hashes a checkpoint file's bytes (laid out from the staged data) before writing, so
the hash names the file's content; the :class:`ContentIndex` names a published checkpoint that had
that content. The index may be stale, and a file beside another checkpoint may have been changed or
planted: :func:`link_identical` links a candidate only if it is this user's file and its bytes hash to
the content, checked under its publishing lock.

On a node shared by several Unix users, the index's directory is used only if it is this user's and
private (mode 0700): an index another user can write would let them choose what our saves are linked
to. Otherwise the index lives in the writer's memory (:class:`ContentIndex`).

Hard links are safe here because fedckpt never writes into a published file: every version is a
new file renamed into place, so a rename replaces one name's inode and leaves the inode that other
names share untouched. Each name still loads on its own, ``fedckpt verify`` checks each, and
deleting one leaves the others intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator

from fedckpt.storage import manifest
from fedckpt.storage.atomic import claim_temp, discard_temp, read_small_file, write_small_file
from fedckpt.storage.checksum import checksum_of_file
from fedckpt.storage.paths import Location

log = logging.getLogger("fedckpt")

# Content index entries are shared by the writers of one node through tmpfs files: each writer of a
# pool owns a share of the keys, and one global model saved by ten clients lands on all of them.
INDEX_DIR = f"/dev/shm/.fedckpt-content-{os.getuid()}" if hasattr(os, "getuid") else ""
INDEX_CAPACITY = 1024  # entries kept; the oldest go first
PRUNE_EVERY = 256  # records between two prunes
# How long a save waits for another thread of this process writing the same content, to link to it.
CLAIM_WAIT_SECONDS = 60.0


class ContentIndex:
    """Checksum -> the path of a checkpoint published with that content (a hint, checked on use).

    Entries are files in ``directory``, shared by the writers of this user on the node, if that
    directory is this user's and private (made so when it does not exist); else (another user's, open
    to others, a symbolic link: one warning) or without a directory, in this process's memory only,
    which still links identical saves that reach the same writer.
    """

    def __init__(self, directory: str | None = INDEX_DIR, capacity: int = INDEX_CAPACITY) -> None:
        self.capacity = capacity
        self.directory = directory if directory and _private_dir(directory) else None
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
            return read_small_file(self._entry(checksum)).decode() or None
        except (OSError, UnicodeDecodeError):
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
            write_small_file(temp, path.encode(), os.O_CREAT | os.O_TRUNC)
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


_warned_dirs: set[str] = set()


def _private_dir(directory: str) -> bool:
    """Whether ``directory`` is this user's own, mode 0700 and no symbolic link (created so if missing).
    Warns once per directory that exists but is not."""
    try:
        os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # the umask may have taken bits of it away
    except FileExistsError:
        pass
    except OSError as error:  # no room (a full /dev/shm), no /dev/shm: nothing to warn about, nor share
        log.debug("fedckpt: no shared content index at %s: %s", directory, error)
        return False
    try:
        status = os.lstat(directory)
    except OSError as error:
        log.debug("fedckpt: no shared content index at %s: %s", directory, error)
        return False
    mode = stat.S_IMODE(status.st_mode)
    if stat.S_ISLNK(status.st_mode):
        why = "it is a symbolic link"
    elif not stat.S_ISDIR(status.st_mode):
        why = "it is not a directory"
    elif status.st_uid != os.getuid():
        why = f"it is owned by uid {status.st_uid}, not by this user (uid {os.getuid()})"
    elif mode != 0o700:
        why = f"it has mode {mode:#o}, not 0o700"
    else:
        return True
    if directory not in _warned_dirs:
        _warned_dirs.add(directory)
        message = (
            f"fedckpt: not using the content index at {directory}: {why}. Another user could choose what "
            "checkpoints are linked to; identical saves are deduplicated only within each writer process"
        )
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False


def link_identical(candidate: str, checksum: str, target: str) -> bool:
    """Hard-link ``candidate`` at ``target`` if its current version has content ``checksum``.

    Checked under the candidate's publishing lock, where its manifest entry describes the file
    beside it; the link is made under the same lock, so it names exactly that version. The entry is
    not trusted on its own (another user who can write beside the candidate could plant a file and
    an entry claiming our content, and loading a checkpoint runs pickle): the candidate must be a
    regular file of this user that nobody else can write, and its bytes must hash to ``checksum``.
    The file is hashed through a descriptor and the link checked to be that same inode, so a file
    swapped in meanwhile is never linked. False (and nothing made) when the candidate changed, is
    gone, fails a check, or cannot be linked (another file system, one without hard links, an object
    store), or when the candidate's manifest entry cannot be read (corrupt, or an I/O error): the save
    then writes its own file.

    Cost: reading and hashing the candidate (XXH3 at about 20 GB/s, from the page cache when it was
    written or linked recently), under its publishing lock, instead of writing and fsyncing a file
    of the same size. XXH3 is no cryptographic hash: the ownership check is what keeps other users'
    files out; the hash catches a file that no longer holds what its entry says.
    """
    if Location.of(candidate).is_url:  # the node's content index names checkpoints on object stores too
        return False
    with manifest.publishing_lock(candidate):
        try:
            entry = manifest.read_entry_locked(candidate)
        except (OSError, ValueError, TypeError) as error:  # that checkpoint's own loads report it, not this save
            log.debug("fedckpt: not linking to %s: its manifest entry cannot be read: %s", candidate, error)
            return False
        if entry is None or entry.checksum != checksum:
            return False
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            verified = os.fstat(fd)
            if not (
                stat.S_ISREG(verified.st_mode)
                and verified.st_uid == os.getuid()
                and not verified.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                and verified.st_size == entry.bytes
                and checksum_of_file(fd, checksum.partition(":")[0]) == checksum
            ):
                return False
            claim_temp(target, link_from=candidate)
        except OSError:  # unreadable, or no link possible here: the save writes its own file
            return False
        finally:
            os.close(fd)
        linked = os.stat(target)
        if (linked.st_dev, linked.st_ino) != (verified.st_dev, verified.st_ino):  # swapped after the check
            discard_temp(target)
            return False
    return True
