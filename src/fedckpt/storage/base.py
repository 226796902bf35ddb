"""The storage interface: where the checkpoints of one location live, and how a version is committed.

Two backends: :class:`~fedckpt.storage.posix.PosixStorage` (local or shared POSIX file systems:
temp file, fsync, rename) and :class:`~fedckpt.storage.fsspec_storage.FsspecStorage` (S3, GCS,
Azure and any fsspec URL: each version its own object, the manifest object written last as the
commit). :func:`storage_for` picks one from the checkpoint's path.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from fedckpt.storage.dedup import ContentIndex
from fedckpt.storage.manifest import ManifestEntry
from fedckpt.storage.paths import Location

T = TypeVar("T")


@dataclass(frozen=True)
class Persisted:
    """A version now on storage."""

    entry: ManifestEntry
    linked: bool  # its content was on storage already: linked or copied there, not written


@dataclass(frozen=True)
class SaveTarget:
    """One version to persist: what the writer knows of a save besides its bytes."""

    path: str
    kind: str
    layout: dict[str, Any]
    sequence: tuple[int, int]
    score: float | None
    score_name: str | None
    writer_name: str
    server_round: int | None = None  # with a retention policy: the round it is kept as
    scores: dict[str, float] | None = None  # and what the policy ranks it by
    round_clients: int | None = None  # a server state: the clients whose states its round commits

    def version_fields(self) -> dict[str, Any]:
        """What its manifest entry records of a save with a retention policy."""
        return {"server_round": self.server_round, "scores": self.scores, "round_clients": self.round_clients}


@dataclass(frozen=True)
class RoundVersion:
    """A round's version of a checkpoint on storage (see :mod:`fedckpt.retention`)."""

    server_round: int
    path: str
    entry: ManifestEntry


@dataclass(frozen=True)
class VersionListing:
    """The round versions of one checkpoint, and what deletions cut off by a crash left of others (for
    :meth:`Storage.remove_leftover`: an entry whose file is gone, or an object whose entry is gone)."""

    recorded: dict[int, RoundVersion]
    leftovers: list[str]


@dataclass(frozen=True)
class StoredVersion:
    """A checkpoint's current version, read whole."""

    entry: ManifestEntry | None  # None: a file no fedckpt manifest records (POSIX only)
    data: bytes


@dataclass(frozen=True)
class VerifyReport:
    """What ``fedckpt verify`` found below a directory."""

    checked: int
    problems: list[str]  # versions missing, or not what their manifest entry records
    leftovers: list[str] = field(default_factory=list)  # objects no entry names (uploads cut off by a crash)


class Storage(ABC):
    """The checkpoints of one file system: persisting versions in order, and reading them back."""

    @abstractmethod
    def persist(self, target: SaveTarget, data: memoryview, content_index: ContentIndex | None) -> Persisted | None:
        """Write one version atomically and record it in the manifest; None (nothing changed) when
        the checkpoint already holds a newer sequence."""

    @abstractmethod
    def make_version(self, path: str, sequence: tuple[int, int], version_path: str, freed_bytes: int) -> bool:
        """Publish the checkpoint's current version at ``version_path`` too (a hard link, or a copy on
        the server), if that version is ``sequence``; False otherwise. True also if ``version_path``
        holds ``sequence`` or a newer one already. Its entry is the checkpoint's, and records
        ``freed_bytes``: what the deletions its save asked for free."""

    @abstractmethod
    def versions_of(self, path: str) -> VersionListing:
        """The round versions beside the checkpoint ``path``."""

    @abstractmethod
    def remove_version(self, version: RoundVersion) -> None:
        """Delete a round version; one cut off by a crash is a leftover in the next listing."""

    @abstractmethod
    def remove_leftover(self, leftover: str) -> None:
        """Finish a deletion cut off by a crash (one of :attr:`VersionListing.leftovers`)."""

    @abstractmethod
    def read_entry(self, path: str) -> ManifestEntry | None:
        """The manifest entry of the version a reader sees now (None: none saved)."""

    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether a version of the checkpoint can be read."""

    @abstractmethod
    def local_path(self, path: str) -> str | None:
        """A local file holding the current version, to read in place; None: use :meth:`read_current`."""

    @abstractmethod
    def read_current(self, path: str, read: Callable[[ManifestEntry | None, BinaryIO], T]) -> T:
        """``read(entry, file)`` of the current version, ``file`` a seekable binary file of it (read
        as it is read: never whole in memory first). ``FileNotFoundError`` if there is none;
        ``CorruptCheckpointError`` if the manifest names a version that is missing. On an object
        store, ``read`` runs again on the newer version if the one it read was deleted under it."""

    def read_version(self, path: str) -> StoredVersion:
        """The current version, read whole (loads use :meth:`read_current`: they hold no copy of it)."""
        return self.read_current(path, lambda entry, file: StoredVersion(entry, file.read()))

    @abstractmethod
    def is_directory(self, root: str) -> bool:
        """Whether ``root`` is a directory (or a prefix) that can hold checkpoints."""

    @abstractmethod
    def iter_entries(self, root: str) -> Iterator[tuple[str, ManifestEntry]]:
        """Every (checkpoint path, entry) below ``root``, in path order."""

    @abstractmethod
    def verify(self, root: str) -> VerifyReport:
        """Check every checkpoint below ``root`` against its manifest entry."""


# fsspec options for checkpoint URLs from fedckpt.init(storage_options=...): this process's default.
_default_options: dict[str, Any] = {}


def set_default_storage_options(options: Mapping[str, Any] | None) -> None:
    _default_options.clear()
    _default_options.update(options or {})


def storage_options_for(path: str, chosen: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The options a writer needs for ``path``: ``chosen`` (a checkpointer's), else this process's
    default; None for local paths, or when none were given."""
    if not Location.of(path).is_url:
        return None
    options = _default_options if chosen is None else chosen
    return dict(options) if options else None


def close_file_systems() -> None:
    """Close the object-store sessions this process opened (at exit, while their event loop runs)."""
    fsspec_backend = sys.modules.get("fedckpt.storage.fsspec_storage")  # none opened if never imported
    if fsspec_backend is not None:
        fsspec_backend.close_sessions()


def storage_for(path: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The storage backend of ``path``: POSIX for local paths, fsspec for URLs (with
    ``storage_options``, else this process's default; credentials otherwise come from the
    environment, as fsspec's backends find them)."""
    if not Location.of(path).is_url:
        from fedckpt.storage.posix import POSIX

        return POSIX
    from fedckpt.storage.fsspec_storage import FsspecStorage  # fsspec is imported for URLs only

    options = _default_options if storage_options is None else storage_options
    return FsspecStorage(path, dict(options))
