"""The fsspec backend: checkpoints on object stores (S3, GCS, Azure) and any fsspec file system.

An object store has no rename, so a version is never written where a reader looks:

- each version is an object of its own, ``<dir>/.fedckpt/versions/<name>/<epoch>-<number>-<random>``,
  uploaded in parts straight from the staging memory (a model file whose content is on the store
  already is copied there by the server instead);
- the manifest entry ``<dir>/.fedckpt/<name>.json`` names the current version's object. Writing it
  is the commit, and it is conditional where the store offers conditional writes (S3: ``If-Match``
  on the entry's ETag, ``If-None-Match: *`` for the first): of two incarnations of a writer racing,
  the older sequence never replaces the newer one's entry;
- then the superseded object is deleted. A reader follows the entry; one whose object was deleted
  meanwhile reads the entry again. Objects left by uploads cut off by a crash (and, on S3, their
  incomplete multipart uploads) are deleted by the next writer of the key; ``fedckpt verify`` lists them.

On S3 the conditional writes are checked first (:mod:`~fedckpt.storage.s3_store`): a store that
ignores them is an error, unless the ``conditional_writes=False`` storage option accepts the weaker
order (see docs/object-storage.md).
"""

from __future__ import annotations

import inspect
import logging
import posixpath
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, BinaryIO, cast

import fsspec
import fsspec.core

from fedckpt import _compat, retention
from fedckpt.errors import CorruptCheckpointError
from fedckpt.storage import s3_store, s3_upload
from fedckpt.storage.base import Persisted, RoundVersion, SaveTarget, Storage, T, VerifyReport, VersionListing
from fedckpt.storage.checksum import RunningChecksum
from fedckpt.storage.dedup import ContentIndex
from fedckpt.storage.formats.laid_out import lay_out
from fedckpt.storage.manifest import ManifestEntry
from fedckpt.storage.object_file import ObjectFile
from fedckpt.storage.paths import CONTROL_DIR, ENTRY_SUFFIX, Location

log = logging.getLogger("fedckpt.storage")

VERSIONS_DIR = "versions"
PART_BYTES = 64 << 20  # multipart upload part size (S3: 5 MiB to 5 GiB)
COMMIT_ATTEMPTS = 20  # conditional writes lost to another writer of the key before giving up
READ_ATTEMPTS = 5  # a reader's object deleted under it by a newer commit
CONDITIONAL_OPTION = "conditional_writes"  # fedckpt's own storage option (not passed to fsspec)

# The file systems this process opened, closed at its exit (base.close_file_systems).
_opened: weakref.WeakSet[Any] = weakref.WeakSet()


def close_sessions() -> None:
    """Close every object-store session this process opened, now (s3fs would close them from its
    finalizers during interpreter shutdown, with its event loop's thread going away)."""
    for fs in list(_opened):
        try:
            _compat.close_s3_session(fs)
        except Exception as error:  # at exit: nothing left to save through it
            log.debug("fedckpt: closing %s failed: %s", type(fs).__name__, error)
    _opened.clear()


# Keys whose leftovers this process already looked for (once per key and process).
_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def version_name(name: str, sequence: tuple[int, int]) -> str:
    """A fresh object name for one version (relative to the control directory): sortable by
    sequence, unique per upload (two incarnations may upload the same sequence)."""
    return f"{VERSIONS_DIR}/{name}/{sequence[0]:020d}-{sequence[1]:020d}-{uuid.uuid4().hex[:12]}"


def sequence_of(object_name: str) -> tuple[int, int] | None:
    parts = posixpath.basename(object_name).split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


class FsspecStorage(Storage):
    """Checkpoints as objects, committed by their manifest entry (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        """The file system of ``url`` with ``storage_options`` (and any options its URL carries,
        such as an Azure account in ``abfs://container@account``)."""
        location = Location.of(url)
        if not location.is_url:
            raise ValueError(f"FsspecStorage takes URLs, not the local path {url!r} (storage_for gives it POSIX)")
        self.protocol = location.protocol
        options = dict(storage_options)
        self.conditional = self.protocol in s3_store.S3_PROTOCOLS and options.pop(CONDITIONAL_OPTION, True)
        try:
            implementation = fsspec.get_filesystem_class(self.protocol)
            options = {**_compat.options_from_url(implementation, url), **options}
            # No listings cache: a listing cached by one call (a clean-up, verify) would hide objects
            # written after it from later ones (s3fs sizes an object from its parent's listing).
            if _accepts(implementation, "use_listings_cache"):
                options.setdefault("use_listings_cache", False)
            self.fs = implementation(**options)  # fsspec reuses equal instances
            _opened.add(self.fs)
        except ImportError as error:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}.get(
                self.protocol
            )
            hint = (
                f"pip install 'fedckpt[{extra}]'" if extra else f"install fsspec's implementation of {self.protocol}://"
            )
            raise ImportError(f"Checkpoints at {self.protocol}:// URLs need {hint}: {error}") from error

    # ---- writing ---------------------------------------------------------------------------------

    def persist(self, target: SaveTarget, data: memoryview, content_index: ContentIndex | None) -> Persisted | None:
        location = Location.of(target.path)
        control = str(location.control_dir)
        if self.conditional:  # before anything is uploaded: a store that fails the check keeps nothing
            s3_store.check_conditional_writes_once(self.fs, control)
        name = location.name
        obj = version_name(name, target.sequence)
        url = f"{control}/{obj}"
        linked = False
        try:
            file = lay_out(target.kind, target.layout, data)
            checksum, size = file.checksum, file.size
            linked = content_index is not None and self._copy_identical(content_index, checksum, url)
            if not linked:
                self._upload_pieces(url, file.pieces)
            entry = ManifestEntry(
                name=name, format=target.kind, sequence=tuple(target.sequence), score=target.score,
                score_name=target.score_name, bytes=size, checksum=checksum, saved_at=time.time(),
                writer=target.writer_name, object=obj, **target.version_fields(),
            )  # fmt: skip
        except BaseException:
            self._remove(url)
            raise
        try:
            committed = self._commit(target.path, entry)
        except BaseException:
            # The entry's write may have reached the store though its answer did not: if the entry
            # names this object, the save is committed; else the object is left to the next clean-up
            # (deleting it could leave a committed entry naming nothing).
            if not self._names(target.path, obj):
                raise
            committed = True
        if not committed:
            self._remove(url)
            return None
        if content_index is not None:
            content_index.record(checksum, target.path)
        try:
            self._clean_leftovers_once(target.path, entry)
        except Exception as error:  # the save is committed; leftovers wait for the next writer
            log.warning("fedckpt: could not clean up old versions of %s: %s", target.path, error)
        return Persisted(entry, linked)

    def make_version(self, path: str, sequence: tuple[int, int], version_path: str, freed_bytes: int) -> bool:
        entry = self.read_entry(path)
        if entry is None or entry.object is None or tuple(entry.sequence) != tuple(sequence):
            return False
        location = Location.of(version_path)
        obj = version_name(location.name, tuple(sequence))
        url = f"{location.control_dir}/{obj}"
        self.fs.cp_file(self._object_url(path, entry), url)  # on the server: nothing is uploaded
        version = replace(entry, name=location.name, object=obj, freed_bytes=freed_bytes, saved_at=time.time())
        try:
            committed = self._commit(version_path, version)
        except BaseException:
            if not self._names(version_path, obj):
                raise
            committed = True
        if not committed:  # it holds this version or a newer one already
            self._remove(url)
        return True

    def versions_of(self, path: str) -> VersionListing:
        """From the entries beside ``path``; objects under ``versions/`` of a version without an entry
        (its deletion removes the entry first) are leftovers."""
        location = Location.of(path)
        control = str(location.control_dir)
        try:
            names = [posixpath.basename(found) for found in self.fs.ls(control, detail=False)]
        except FileNotFoundError:
            names = []
        recorded = {}
        for name in names:
            base = name.removesuffix(ENTRY_SUFFIX)
            server_round = retention.version_round(path, base) if base != name else None
            if server_round is None:
                continue
            found = str(location.parent.join(base))
            entry = self.read_entry(found)
            if entry is not None:
                recorded[server_round] = RoundVersion(server_round, found, entry)
        try:
            stored = [posixpath.basename(found) for found in self.fs.ls(f"{control}/{VERSIONS_DIR}", detail=False)]
        except FileNotFoundError:
            stored = []
        kept = {Location.of(version.path).name for version in recorded.values()}
        leftovers = [
            f"{control}/{VERSIONS_DIR}/{name}"
            for name in sorted(stored)
            if retention.version_round(path, name) is not None and name not in kept
        ]
        return VersionListing(recorded, leftovers)

    def remove_version(self, version: RoundVersion) -> None:
        entry_url = str(Location.of(version.path).entry)
        self.fs.rm_file(entry_url)  # first: from now on the version is gone; its objects are leftovers
        location = Location.of(version.path)
        self.remove_leftover(f"{location.control_dir}/{VERSIONS_DIR}/{location.name}")

    def remove_leftover(self, leftover: str) -> None:
        try:
            found = self.fs.find(leftover)
        except FileNotFoundError:
            return
        for key in found:  # keys without the protocol
            self.fs.rm_file(f"{self.protocol}://{key}")

    def _names(self, path: str, obj: str) -> bool:
        """Whether the checkpoint's entry names ``obj`` now (False if it cannot be read)."""
        try:
            current = self.read_entry(path)
        except Exception:
            return False
        return current is not None and current.object == obj

    def _upload_pieces(self, url: str, pieces: list[memoryview]) -> None:
        """One object, the concatenation of ``pieces``. On S3 its parts go up concurrently from the
        staging memory (:mod:`~fedckpt.storage.s3_upload`); elsewhere through fsspec's file writer,
        in parts of PART_BYTES. A failed upload is aborted; one cut off by a crash leaves no object."""
        if self.protocol in s3_store.S3_PROTOCOLS:
            s3_upload.upload(self.fs, fsspec.core.strip_protocol(url), pieces)
            return
        with self.fs.open(url, "wb", block_size=PART_BYTES) as out:
            for piece in pieces:
                for start in range(0, len(piece), PART_BYTES):  # part-sized slices: no copy of the whole
                    out.write(piece[start : start + PART_BYTES])

    def _copy_identical(self, content_index: ContentIndex, checksum: str, url: str) -> bool:
        """Copy a checkpoint with the same content on the server (no upload); False if none is known.

        Unlike :func:`~fedckpt.storage.dedup.link_identical`, the copied object's bytes are not hashed
        again: that would mean downloading it, which costs what the copy saves (stores do not compute
        XXH3). The candidate is trusted as far as the checkpoint it names: the node's index is private
        to this user (see :class:`~fedckpt.storage.dedup.ContentIndex`), so the candidate is a
        checkpoint this user's writers published, read with this process's credentials; whoever could
        change what its entry names could equally replace that checkpoint itself (a checkpoint kept
        where others can write is copied as it stands there, as loading it would read it).
        """
        candidate = content_index.candidate(checksum)
        if candidate is None or Location.of(candidate).protocol != self.protocol:
            return False
        # The index is shared by the node's writers (other runs, buckets, credentials): any failure
        # here (superseded and deleted meanwhile, no right to read it) means uploading instead.
        try:
            entry = self.read_entry(candidate)
            if entry is None or entry.checksum != checksum or entry.object is None:
                return False
            self.fs.cp_file(self._object_url(candidate, entry), url)
        except Exception as error:
            log.debug("fedckpt: no server-side copy from %s (%s); uploading", candidate, error)
            return False
        return True

    def _commit(self, path: str, entry: ManifestEntry) -> bool:
        """Write ``entry`` as the checkpoint's current one unless its sequence, or a newer one, is
        there (a save sent twice is committed once)."""
        entry_url = str(Location.of(path).entry)
        for attempt in range(COMMIT_ATTEMPTS):
            current, tag = self._read_entry_and_tag(entry_url)
            if current is not None and tuple(current.sequence) >= tuple(entry.sequence):
                return False
            try:
                self._write_entry(entry_url, entry, tag)
            except (FileExistsError, _PreconditionFailed):
                _backoff(attempt)
                continue  # another writer committed in between: look again
            if current is not None and current.object is not None and current.object != entry.object:
                self._remove(self._object_url(path, current))
            return True
        raise TimeoutError(f"{path}: {COMMIT_ATTEMPTS} conditional writes of its manifest entry lost to other writers")

    def _write_entry(self, entry_url: str, entry: ManifestEntry, tag: str | None) -> None:
        condition: dict[str, str] = {}
        if self.conditional:
            condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            self.fs.pipe_file(entry_url, entry.to_json().encode(), **condition)
        except OSError as error:
            if self.conditional and s3_store.lost_race(error, tag):
                raise _PreconditionFailed(str(error)) from error
            raise

    def _read_entry_and_tag(self, entry_url: str) -> tuple[ManifestEntry | None, str | None]:
        """The entry and its ETag: the tag first, so that the content read is at least as new."""
        try:
            tag = self.fs.info(entry_url).get("ETag") if self.conditional else None
            return ManifestEntry.from_json(self.fs.cat_file(entry_url).decode()), tag
        except FileNotFoundError:
            return None, None

    def _clean_leftovers_once(self, path: str, committed: ManifestEntry) -> None:
        """Delete the key's objects older than the committed version (uploads cut off by a crash,
        superseded versions whose deletion was lost), the first time this process commits the key."""
        with _cleaned_lock:
            if path in _cleaned:
                return
        for url in self._version_objects(path):
            sequence = sequence_of(url)
            if sequence is not None and sequence < tuple(committed.sequence):
                self._remove(url)
        for upload in self._incomplete_uploads(self._versions_prefix(path)):
            sequence = sequence_of(upload.path)
            if sequence is not None and sequence < tuple(committed.sequence):
                s3_store.abort_upload(self.fs, upload)
        with _cleaned_lock:
            _cleaned.add(path)  # only once it succeeded: an error (no ListBucket right) tries again

    def _versions_prefix(self, path: str) -> str:
        location = Location.of(path)
        return f"{location.control_dir}/{VERSIONS_DIR}/{location.name}/"

    def _version_objects(self, path: str) -> list[str]:
        try:
            return [f"{self.protocol}://{found}" for found in self.fs.find(self._versions_prefix(path))]
        except FileNotFoundError:
            return []

    def _incomplete_uploads(self, prefix: str) -> list[s3_store.IncompleteUpload]:
        return s3_store.incomplete_uploads(self.fs, prefix) if self.protocol in s3_store.S3_PROTOCOLS else []

    def _remove(self, url: str) -> None:
        try:
            self.fs.rm_file(url)
        except FileNotFoundError:
            pass
        except OSError as error:  # a leftover for the next writer or verify, not a failed save
            log.warning("fedckpt: could not delete %s: %s", url, error)

    # ---- reading ---------------------------------------------------------------------------------

    def _object_url(self, path: str, entry: ManifestEntry) -> str:
        assert entry.object is not None
        return f"{Location.of(path).control_dir}/{entry.object}"

    def read_entry(self, path: str) -> ManifestEntry | None:
        """The entry alone (one GET): only a commit needs its ETag, and the HEAD that reads it."""
        try:
            return ManifestEntry.from_json(self.fs.cat_file(str(Location.of(path).entry)).decode())
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self.read_entry(path) is not None

    def local_path(self, path: str) -> str | None:
        return None

    def read_current(self, path: str, read: Callable[[ManifestEntry | None, BinaryIO], T]) -> T:
        """``read`` the current version through an :class:`ObjectFile` (ranged GETs: the object is
        never whole in memory); again on the newer version if its object is deleted meanwhile."""
        missing = None
        for attempt in range(READ_ATTEMPTS):
            entry = self.read_entry(path)
            if entry is None or entry.object is None:
                raise FileNotFoundError(f"No checkpoint at {path}")
            s3 = self.protocol in s3_store.S3_PROTOCOLS
            with ObjectFile(self.fs, self._object_url(path, entry), entry.bytes, s3=s3) as file:
                try:
                    return read(entry, cast(BinaryIO, file))
                except Exception:
                    # Whatever a reader made of it (torch wraps errors of the file it reads), a read
                    # that found the object gone is not this version's content: look at the entry again.
                    if not file.missing:
                        raise
            # A commit writes the new entry before it deletes the old object: an entry that still
            # names an object found missing is dangling, not a version being replaced.
            if entry.object == missing:
                raise CorruptCheckpointError(
                    f"{path}: its manifest entry names the object {entry.object}, which is missing "
                    f"(fedckpt verify lists such entries)"
                )
            missing = entry.object
            _backoff(attempt)
        raise TimeoutError(f"{path}: a newer version was committed during each of {READ_ATTEMPTS} reads")

    def is_directory(self, root: str) -> bool:
        try:
            return self.fs.isdir(root)
        except FileNotFoundError:
            return False

    def iter_entries(self, root: str) -> Iterator[tuple[str, ManifestEntry]]:
        for path, _ in sorted(self._entries(root)):
            entry = self.read_entry(path)
            if entry is not None:
                yield path, entry

    def _entries(self, root: str) -> list[tuple[str, str]]:
        """(checkpoint URL, entry URL) of every manifest entry below ``root``."""
        found = []
        for key in self.fs.find(root):
            parent = posixpath.dirname(key)
            if posixpath.basename(parent) == CONTROL_DIR and key.endswith(ENTRY_SUFFIX):
                checkpoint = Location(self.protocol, posixpath.dirname(parent)).join(
                    posixpath.basename(key)[: -len(ENTRY_SUFFIX)]
                )
                found.append((str(checkpoint), f"{self.protocol}://{key}"))
        return found

    def verify(self, root: str) -> VerifyReport:
        problems, named, checked = [], set(), 0
        for path, entry in self.iter_entries(root):
            checked += 1
            problem = self._check_version(path, entry)
            if problem is not None and "missing" in problem:
                newer = self.read_entry(path)  # a live run may have replaced and deleted it since
                if newer is not None and newer.object != entry.object:
                    entry, problem = newer, self._check_version(path, newer)
            named.add(fsspec.core.strip_protocol(self._object_url(path, entry)))
            if problem is not None:
                problems.append(problem)
        leftovers = [
            f"{self.protocol}://{key}"
            for key in self.fs.find(root)
            if f"/{CONTROL_DIR}/{VERSIONS_DIR}/" in f"/{key}" and key not in named
        ]
        leftovers += [
            f"{self.protocol}://{upload.path} (incomplete multipart upload)"
            for upload in self._incomplete_uploads(root)
        ]
        return VerifyReport(checked, problems, sorted(leftovers))

    def _check_version(self, path: str, entry: ManifestEntry) -> str | None:
        """What is wrong with the version ``entry`` names (None: its size and checksum match)."""
        try:
            size, checksum = self._size_and_checksum(self._object_url(path, entry), entry.checksum.partition(":")[0])
        except FileNotFoundError:
            return f"{path}: its object {entry.object} is missing"
        if size != entry.bytes:
            return f"{path}: size {size} bytes, the manifest records {entry.bytes}"
        if checksum != entry.checksum:
            return f"{path}: checksum does not match the manifest ({entry.checksum})"
        return None

    def _size_and_checksum(self, url: str, algorithm: str) -> tuple[int, str]:
        running, size = RunningChecksum(algorithm), 0
        with self.fs.open(url, "rb", block_size=PART_BYTES) as source:
            while chunk := source.read(PART_BYTES):
                running.update(chunk)
                size += len(chunk)
        return size, running.value()


def _accepts(implementation: type, option: str) -> bool:
    """Whether a file system's constructor takes ``option`` (by name, or through ``**kwargs``)."""
    parameters = inspect.signature(implementation.__init__).parameters.values()
    return any(p.name == option or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _backoff(attempt: int) -> None:
    """A short, jittered pause before looking at a contested entry again."""
    time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))


class _PreconditionFailed(Exception):
    """A conditional write of a manifest entry lost: the entry changed since it was read."""
