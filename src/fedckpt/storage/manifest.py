"""The manifest: one JSON entry per checkpoint in ``.fedckpt/`` beside it.

An entry records the version of the checkpoint on disk: its sequence (writer epoch, number),
score, byte size, checksum and time. Entries are per checkpoint rather than one file per directory
so that writers of different checkpoints never contend for the same file.

Commit order: the new entry is written durably as ``<entry>.next``, then the checkpoint is renamed
into place, then ``.next`` over the entry. A crash between the two renames leaves a ``.next`` whose
checksum matches the checkpoint; :func:`read_entry` rolls it forward.

Publishing a version (the sequence check, ``.next``, the rename, the commit) holds a per-checkpoint
lock file, ``<entry>.lock``, and so do readers of the entry. Two incarnations of a writer can both
be alive for a moment (one on a node that is being lost), and a reader (``fedckpt verify`` on a live
run) must neither roll a half-published version back nor pair an entry with the wrong file. The
locks are POSIX record locks, which NFS v4 and the cluster file systems honour across hosts.

All of this is for local (or shared POSIX) files: every function here refuses a URL with a
``ValueError`` (an object store's manifest entries are kept by
:mod:`fedckpt.storage.fsspec_storage`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from fedckpt.storage.atomic import (
    fsync_path,
    make_directory,
    publish,
    read_small_file,
    remove_quietly,
    write_durable_temp,
    write_small_file,
)
from fedckpt.storage.checksum import file_matches
from fedckpt.storage.paths import CONTROL_DIR, ENTRY_SUFFIX, Location

NEXT_SUFFIX = ".next"
# What an entry records of a save with a retention policy (fedckpt.retention), left out when unset.
VERSION_FIELDS = ("server_round", "scores", "round_clients", "freed_bytes")


def _local(checkpoint_path: str, user: str) -> tuple[str, str]:
    """(the checkpoint's local path, its entry's path) for ``user``; a ``ValueError`` for a URL."""
    location = Location.of(checkpoint_path)
    return location.local_path(f"fedckpt.storage.manifest.{user}"), str(location.entry)


@dataclass
class ManifestEntry:
    """What fedckpt knows of the version of one checkpoint on disk."""

    name: str
    format: str
    sequence: tuple[int, int]
    score: float | None
    score_name: str | None
    bytes: int
    checksum: str  # "<algorithm>:<hex>", see fedckpt.storage.checksum
    saved_at: float
    writer: str
    # On an object store: the object holding this version, relative to the entry's directory
    # (``versions/<name>/<sequence>-<random>``); None for a file, which is the checkpoint itself.
    object: str | None = None
    # A save of a checkpoint with a retention policy (fedckpt.retention): the round it is kept as, and
    # the scores the policy ranks it by.
    server_round: int | None = None
    scores: dict[str, float] | None = None
    round_clients: int | None = None  # a server state: the clients whose states its round commits
    freed_bytes: int | None = None  # a round version: the bytes of the versions its save deleted

    def to_json(self) -> str:
        data = asdict(self)
        for field in VERSION_FIELDS:  # entries without versions stay as earlier releases wrote them
            if data[field] is None:
                del data[field]
        return json.dumps(data, allow_nan=True, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ManifestEntry:
        data = json.loads(text)
        data["sequence"] = tuple(data["sequence"])
        if "sha256" in data:  # written by fedckpt 0.1
            data["checksum"] = "sha256:" + data.pop("sha256")
        return cls(**data)


def entry_location(checkpoint_path: str) -> str:
    """Where the manifest entry of a local checkpoint lives."""
    return _local(checkpoint_path, "entry_location")[1]


def _write_json(path: str, text: str) -> str:
    return write_durable_temp(path, lambda temp: write_small_file(temp, text.encode()))[0]


def stage_entry(checkpoint_path: str, entry: ManifestEntry) -> str:
    """Write the entry of a version about to be published as ``<entry>.next`` (durably)."""
    target = _local(checkpoint_path, "stage_entry")[1] + NEXT_SUFFIX
    publish(_write_json(target, entry.to_json()), target)
    return target


def commit_entry(checkpoint_path: str) -> None:
    """Make the staged entry the current one (after the checkpoint itself was published)."""
    target = _local(checkpoint_path, "commit_entry")[1]
    os.replace(target + NEXT_SUFFIX, target)
    fsync_path(os.path.dirname(target))


LOCK_SUFFIX = ".lock"


class LocksUnavailable(OSError):
    """The file system of a checkpoint gives no file locks (an NFS mount with ``nolock``)."""


_warned_unlocked: set[str] = set()


@contextlib.contextmanager
def publishing_lock(checkpoint_path: str, reading: bool = False) -> Iterator[None]:
    """Hold the checkpoint's publishing lock (exclusive across processes and hosts).

    Not re-entrant: closing any descriptor of the lock file drops a POSIX lock, so code that holds
    it calls :func:`read_entry_locked`, not :func:`read_entry`.

    Where the file system has no locks (ENOLCK), publishing raises :class:`LocksUnavailable`: two
    incarnations of a writer could otherwise publish over each other. A reader (``reading``) goes
    on without the lock, with one warning per directory: it may see an entry and a file of two
    different versions while a save is being published, which ``fedckpt verify`` then reports.
    """
    checkpoint_path, entry = _local(checkpoint_path, "publishing_lock")
    lock = entry + LOCK_SUFFIX
    # POSIX locks exclude other processes only: the threads of this one (a writer's I/O threads, one
    # publishing a checkpoint while another links to it) take a lock of this process first.
    with _THREAD_LOCKS[hash(lock) % len(_THREAD_LOCKS)]:
        try:
            make_directory(os.path.dirname(lock))
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a read-only copy of the checkpoints: nobody publishes there
            yield
            return
        with _locked(fd, checkpoint_path, reading):
            yield


# Striped: nothing holds two publishing locks at once, so two paths sharing a stripe only wait.
_THREAD_LOCKS = [threading.RLock() for _ in range(64)]


@contextlib.contextmanager
def _locked(fd: int, checkpoint_path: str, reading: bool) -> Iterator[None]:
    """Hold the POSIX lock of the open lock file ``fd`` (see :func:`publishing_lock`)."""
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno != errno.ENOLCK:
                raise
            directory = os.path.dirname(checkpoint_path)
            if not reading:
                raise LocksUnavailable(
                    errno.ENOLCK,
                    f"file locks are not available in {directory} (an NFS mount with 'nolock'?); fedckpt "
                    "needs them so that two writers of one checkpoint never publish over each other: mount "
                    "it with locking (NFS's default) or checkpoint to a file system that has locks",
                ) from error
            if directory not in _warned_unlocked:
                _warned_unlocked.add(directory)
                warnings.warn(
                    f"fedckpt: file locks are not available in {directory} (an NFS mount with 'nolock'?): "
                    "reading manifest entries without the lock",
                    RuntimeWarning,
                    stacklevel=3,
                )
        yield
    finally:
        os.close(fd)  # releases the lock


def read_entry(checkpoint_path: str) -> ManifestEntry | None:
    """The current entry of a checkpoint, rolling forward an entry staged before a crash.

    Without a staged entry no lock is needed: the current one is only ever replaced whole
    (``os.replace``), so a reader sees one entry or the next, never a mix.
    """
    checkpoint_path, current = _local(checkpoint_path, "read_entry")
    if not os.path.exists(current + NEXT_SUFFIX):
        try:
            return ManifestEntry.from_json(_read_text(current))
        except FileNotFoundError:
            if not os.path.exists(current + NEXT_SUFFIX):  # else one was staged meanwhile: look again, locked
                return None
    with publishing_lock(checkpoint_path, reading=True):
        return read_entry_locked(checkpoint_path)


def read_entry_locked(checkpoint_path: str) -> ManifestEntry | None:
    """:func:`read_entry`, for a caller that holds :func:`publishing_lock`."""
    checkpoint_path, current = _local(checkpoint_path, "read_entry_locked")
    staged = current + NEXT_SUFFIX
    if os.path.exists(staged):
        # An error reading the staged entry or the checkpoint (EIO, an NFS hiccup) is raised, and the
        # staged entry kept for a later reader: it may be the only record of the newest version.
        try:
            entry = ManifestEntry.from_json(_read_text(staged))
        except (ValueError, TypeError):  # not an entry at all: nothing to roll forward
            entry = None
        if entry is not None and os.path.exists(checkpoint_path) and file_matches(checkpoint_path, entry.checksum):
            commit_entry(checkpoint_path)
        else:  # the checkpoint rename never happened: the old entry still holds
            remove_quietly(staged)
    if not os.path.exists(current):
        return None
    return ManifestEntry.from_json(_read_text(current))


def _read_text(path: str) -> str:
    return read_small_file(path).decode()


def iter_entries(root: str) -> Iterator[tuple[str, ManifestEntry]]:
    """Every (checkpoint path, entry) below ``root``, in path order."""
    root = Location.of(root).local_path("fedckpt.storage.manifest.iter_entries")
    found = []
    for directory, subdirs, _ in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != CONTROL_DIR)
        control = os.path.join(directory, CONTROL_DIR)
        if not os.path.isdir(control):
            continue
        for name in sorted(os.listdir(control)):
            if name.endswith(ENTRY_SUFFIX):
                found.append(os.path.join(directory, name[: -len(ENTRY_SUFFIX)]))
    for checkpoint_path in found:
        with publishing_lock(checkpoint_path, reading=True):  # entry and file stay a pair while the caller looks
            entry = read_entry_locked(checkpoint_path)
            if entry is not None:
                yield checkpoint_path, entry
