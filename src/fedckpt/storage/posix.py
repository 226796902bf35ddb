"""The POSIX backend: checkpoints on a local or shared POSIX file system (NFS, Lustre, CephFS...).

A version is a temp file written and fsynced, renamed into place under the checkpoint's publishing
lock, with its manifest entry (see :mod:`fedckpt.storage.manifest`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from fedckpt import retention
from fedckpt.storage import manifest
from fedckpt.storage.atomic import (
    claim_temp,
    discard_temp,
    fsync_path,
    make_directory,
    publish,
    remove_quietly,
    write_durable_temp,
)
from fedckpt.storage.base import Persisted, RoundVersion, SaveTarget, Storage, T, VerifyReport, VersionListing
from fedckpt.storage.checksum import file_matches
from fedckpt.storage.dedup import ContentIndex, link_identical
from fedckpt.storage.formats.laid_out import lay_out, write_laid_out
from fedckpt.storage.paths import CONTROL_DIR, ENTRY_SUFFIX, Location, temp_path


class PosixStorage(Storage):
    """Checkpoints as files; each version renamed into place (see the module docstring)."""

    def persist(self, target: SaveTarget, data: memoryview, content_index: ContentIndex | None) -> Persisted | None:
        return persist_checkpoint(
            target.path, target.kind, target.layout, data, target.sequence, target.score, target.score_name,
            target.writer_name, content_index, version_fields=target.version_fields(),
        )  # fmt: skip

    def make_version(self, path: str, sequence: tuple[int, int], version_path: str, freed_bytes: int) -> bool:
        temp = temp_path(version_path)
        make_directory(os.path.dirname(temp))
        with manifest.publishing_lock(path):  # the link names exactly the version its entry records
            entry = manifest.read_entry_locked(path)
            if entry is None or tuple(entry.sequence) != tuple(sequence):
                return False
            claim_temp(temp, link_from=path)
        fsync_path(temp)
        fields = {**{field: getattr(entry, field) for field in manifest.VERSION_FIELDS}, "freed_bytes": freed_bytes}
        _publish(
            version_path, entry.format, temp, entry.checksum, tuple(sequence), entry.score, entry.score_name,
            entry.writer, linked=True,
            version_fields=fields,
        )  # fmt: skip
        return True

    def versions_of(self, path: str) -> VersionListing:
        """From the entries beside ``path``: a version's file is removed before its entry, so files
        without an entry (a user's own, say) are never taken for fedckpt's, and an entry without its
        file is a deletion to finish."""
        directory = os.path.dirname(path)
        try:
            names = os.listdir(os.path.join(directory, CONTROL_DIR))
        except FileNotFoundError:
            names = []
        recorded, leftovers = {}, []
        for name in sorted(names):
            base = name.removesuffix(manifest.NEXT_SUFFIX).removesuffix(ENTRY_SUFFIX)
            server_round = retention.version_round(path, base) if base != name else None
            found = os.path.join(directory, base)
            if server_round is None or server_round in recorded or found in leftovers:
                continue
            entry = manifest.read_entry(found)  # rolls forward a version published before a crash
            if entry is not None and os.path.exists(found):
                recorded[server_round] = RoundVersion(server_round, found, entry)
            elif entry is not None:
                leftovers.append(found)
        return VersionListing(recorded, leftovers)

    def remove_version(self, version: RoundVersion) -> None:
        with manifest.publishing_lock(version.path):
            remove_quietly(version.path)  # first: a file is never left without its entry
            fsync_path(os.path.dirname(version.path))
            self._remove_entry(version.path)

    def remove_leftover(self, leftover: str) -> None:
        with manifest.publishing_lock(leftover):
            if not os.path.exists(leftover):
                self._remove_entry(leftover)

    @staticmethod
    def _remove_entry(path: str) -> None:
        """Under the checkpoint's publishing lock: its entry goes, and the lock file with it."""
        entry = manifest.entry_location(path)
        remove_quietly(entry + manifest.NEXT_SUFFIX)
        remove_quietly(entry)
        fsync_path(os.path.dirname(entry))
        remove_quietly(entry + manifest.LOCK_SUFFIX)  # held here: a reader waiting on it then finds no entry

    def read_entry(self, path: str) -> manifest.ManifestEntry | None:
        return manifest.read_entry(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def local_path(self, path: str) -> str | None:
        return path

    def read_current(self, path: str, read: Callable[[manifest.ManifestEntry | None, BinaryIO], T]) -> T:
        with open(path, "rb") as file:
            return read(self.read_entry(path), file)

    def is_directory(self, root: str) -> bool:
        return os.path.isdir(root)

    def iter_entries(self, root: str) -> Iterator[tuple[str, manifest.ManifestEntry]]:
        return manifest.iter_entries(root)

    def verify(self, root: str) -> VerifyReport:
        problems, checked = [], 0
        for path, entry in manifest.iter_entries(root):
            checked += 1
            if not os.path.exists(path):
                problems.append(f"{path}: missing (the manifest records {entry.bytes} bytes)")
                continue
            size = os.path.getsize(path)
            if size != entry.bytes:
                problems.append(f"{path}: size {size} bytes, the manifest records {entry.bytes}")
            elif not file_matches(path, entry.checksum):
                problems.append(f"{path}: checksum does not match the manifest ({entry.checksum})")
        return VerifyReport(checked, problems)


POSIX = PosixStorage()


def persist_checkpoint(
    path: str,
    kind: str,
    layout: dict[str, Any],
    data: memoryview,
    sequence: tuple[int, int],
    score: float | None,
    score_name: str | None,
    writer_name: str,
    content_index: ContentIndex | None = None,
    *,
    version_fields: dict[str, Any] | None = None,
) -> Persisted | None:
    """Write a snapshot (its ``layout`` and staged ``data``) atomically and durably at ``path``,
    and record it in the manifest.

    The file's checksum is computed before it is written, and names its content: if
    ``content_index`` knows a checkpoint with that content, the new version is a hard link to it.
    Returns None, leaving the checkpoint untouched, when the version on disk has this sequence or a
    newer one (a re-sent save of a restarted writer must never replace a newer checkpoint, nor be
    published twice). A ``ValueError`` for a URL (:func:`fedckpt.storage.base.storage_for` gives
    those the fsspec backend).
    """
    path = Location.of(path).local_path("fedckpt.storage.posix.persist_checkpoint")
    make_directory(os.path.dirname(path))
    file = lay_out(kind, layout, data)
    if content_index is None:
        temp, _ = write_durable_temp(path, lambda target: write_laid_out(file, target))
        return _publish(
            path, kind, temp, file.checksum, sequence, score, score_name, writer_name, False, version_fields
        )
    with content_index.writing(file.checksum) as candidate:
        linked = False

        def write(temp: str) -> None:
            nonlocal linked
            linked = candidate is not None and link_identical(candidate, file.checksum, temp)
            if not linked:
                claim_temp(temp)
                write_laid_out(file, temp)

        temp, _ = write_durable_temp(path, write, claim=False)
        persisted = _publish(
            path, kind, temp, file.checksum, sequence, score, score_name, writer_name, linked, version_fields
        )
        if persisted is not None:
            content_index.record(file.checksum, path)
    return persisted


def _publish(
    path: str,
    kind: str,
    temp: str,
    checksum: str,
    sequence: tuple[int, int],
    score: float | None,
    score_name: str | None,
    writer_name: str,
    linked: bool,
    version_fields: dict[str, Any] | None = None,
) -> Persisted | None:
    """Move a durable temp file into place with its manifest entry, unless a newer version is there."""
    try:
        with manifest.publishing_lock(path):
            # Checked under the lock: another incarnation of this writer (Ray restarted it while the
            # old one, on a node being lost, still ran) may have published a newer version meanwhile.
            # A stale save (a rare re-send) thus costs a discarded temp file, not a read on every save.
            # The same sequence is never published twice: a save sent twice is written once.
            current = manifest.read_entry_locked(path)
            if current is not None and tuple(current.sequence) >= tuple(sequence):
                discard_temp(temp)
                return None
            entry = manifest.ManifestEntry(
                name=os.path.basename(path),
                format=kind,
                sequence=tuple(sequence),
                score=score,
                score_name=score_name,
                bytes=os.path.getsize(temp),
                checksum=checksum,
                saved_at=time.time(),
                writer=writer_name,
                **(version_fields or {}),
            )
            manifest.stage_entry(path, entry)
            publish(temp, path)
            manifest.commit_entry(path)
    except BaseException:
        discard_temp(temp)
        raise
    return Persisted(entry, linked)
