"""Where checkpoints are: :class:`Location` (a local path or a URL), the names of checkpoint files
and of fedckpt's own files beside them.

A checkpoint is a local path or a URL of an fsspec file system (``s3://bucket/run-7/best.pt``).
:class:`Location` is the one place that tells the two apart: a URL is joined and normalised as a
POSIX path after its ``protocol://`` (an object store's keys are literal, so nothing else would
name one object one way), a local path with ``os.path``. What works on local files only (the
manifest, its lock, temp files) refuses URLs with :meth:`Location.local_path`: joining
``s3://bucket/...`` as a local path makes directories named ``s3:`` in the working directory.
"""

from __future__ import annotations

import functools
import os
import posixpath
import random
import re
import socket
from dataclasses import dataclass
from types import ModuleType

CONTROL_DIR = ".fedckpt"
TEMP_DIR = "tmp"
ENTRY_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
_LOCAL_PROTOCOLS = ("file", "local")  # fsspec's names for local files: the path after them is a local path
_PATHS_CACHED = 4096  # paths and names remembered by the caches below (a run has a bounded set)


@dataclass(frozen=True)
class Location:
    """A local path or a URL, normalised: ``protocol`` is ``""`` for a local path.

    ``path`` is the part after ``protocol://`` for a URL (POSIX-normalised, no leading ``/``), or
    the local path (``os.path``-normalised; a relative path stays relative).
    """

    protocol: str
    path: str

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location) -> Location:
        """The location ``where`` names (``file://`` and ``local://`` URLs are local paths)."""
        if isinstance(where, Location):
            return where
        return _location_of(os.fspath(where))

    @staticmethod
    def _parse(text: str) -> Location:
        match = _URL.match(text)
        if match is None:
            return Location("", os.path.normpath(text))
        protocol, rest = match.group(1).lower(), match.group(2)
        if protocol in _LOCAL_PROTOCOLS:
            return Location("", os.path.normpath(rest))
        return Location(protocol, posixpath.normpath(rest).lstrip("/"))

    @property
    def is_url(self) -> bool:
        """Whether this is a location on an fsspec file system other than local files."""
        return bool(self.protocol)

    @property
    def key(self) -> str:
        """The runtime's key of a checkpoint here: its absolute path, or its URL."""
        return str(self) if self.is_url else os.path.abspath(self.path)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}" if self.is_url else self.path

    @property
    def _paths(self) -> ModuleType:
        """``posixpath`` for a URL, ``os.path`` for a local path."""
        return posixpath if self.is_url else os.path

    @property
    def name(self) -> str:
        """The last component."""
        return self._paths.basename(self.path)

    @property
    def parent(self) -> Location:
        """The directory (or prefix) this is in."""
        return Location(self.protocol, self._paths.dirname(self.path) or os.curdir)

    def join(self, *names: str) -> Location:
        """``self/names...``, normalised as :meth:`of` normalises."""
        return Location(self.protocol, self._paths.normpath(self._paths.join(self.path, *names)))

    @property
    def control_dir(self) -> Location:
        """``.fedckpt`` beside the checkpoint (or the one it is already in, for fedckpt's own files)."""
        parent = self.parent
        return parent if parent.name == CONTROL_DIR else parent.join(CONTROL_DIR)

    @property
    def entry(self) -> Location:
        """Where the manifest entry of the checkpoint here lives."""
        return self.control_dir.join(self.name + ENTRY_SUFFIX)

    def local_path(self, user: str) -> str:
        """This location as a local path, for ``user`` (what works on local files only); a
        ``ValueError`` naming the URL and the backend that handles it if this is a URL."""
        if self.is_url:
            raise ValueError(
                f"{user} works on local files only, not on the URL {self}: checkpoints at {self.protocol}:// URLs "
                "are kept by the fsspec backend (fedckpt.storage.fsspec_storage.FsspecStorage, which "
                "fedckpt.storage.base.storage_for(url) returns)"
            )
        return self.path


@functools.lru_cache(maxsize=_PATHS_CACHED)
def _location_of(text: str) -> Location:
    """:meth:`Location.of` of a string: pure (normalising a relative path does not look at the
    working directory), and asked on every save and load."""
    return Location._parse(text)


# Every save and load computes these; each is a pure function of its arguments and the working
# directory (a relative path is made absolute against it), which is therefore part of the cache key.


def checkpoint_key(path: str | os.PathLike[str]) -> str:
    """The runtime's key of a checkpoint: its absolute, normalised path, or its normalised URL."""
    return _checkpoint_key(os.fspath(path), os.getcwd())


@functools.lru_cache(maxsize=_PATHS_CACHED)
def _checkpoint_key(path: str, cwd: str) -> str:
    return Location.of(path).key


def checkpoint_path_in(directory: str | os.PathLike[str], name: str) -> str:
    """``directory/name``, or a ``ValueError`` naming what is wrong with ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"A checkpoint name must be a string, got {type(name).__name__}")
    return _checkpoint_path_in(os.fspath(directory), name, os.getcwd())


@functools.lru_cache(maxsize=_PATHS_CACHED)
def _checkpoint_path_in(directory: str, name: str, cwd: str) -> str:
    if name == "" or name.strip() == "":
        raise ValueError("A checkpoint name must not be empty")
    if "\x00" in name:
        raise ValueError(f"Checkpoint name {name!r} contains a NUL character")
    base = Location.of(directory)
    if os.path.isabs(name) or _URL.match(name):  # FL4Health accepts the full path of a file inside the directory
        full = Location.of(name)
        inside = full._paths.relpath(full.key, base.key) if full.protocol == base.protocol else os.pardir
        if inside == os.curdir or inside.split(os.sep)[0] == os.pardir:
            raise ValueError(f"Checkpoint path {name!r} is not inside the checkpoint directory {directory!r}")
        name = inside
    parts = os.path.normpath(name).split(os.sep)
    if parts[0] == ".." or name.endswith(("/", os.sep)) or parts == ["."]:
        raise ValueError(f"Checkpoint name {name!r} escapes the checkpoint directory or names a directory")
    if CONTROL_DIR in parts:
        raise ValueError(f"Checkpoint name {name!r} uses {CONTROL_DIR!r}, which fedckpt keeps for itself")
    if any(len(part.encode()) > 200 for part in parts):
        raise ValueError(f"Checkpoint name {name[:40]!r}... has a path component longer than 200 bytes")
    # Normalised, so that the writer (which keys by absolute path) and a loader name the same file:
    # "a/../b" would otherwise need a directory "a" to exist to be read back. A URL is normalised
    # as the writer keys it (an object store's keys are literal: "a/../b" is a name).
    return str(base.join(name))


def entry_path(checkpoint_path: str) -> str:
    """Where the manifest entry of a checkpoint lives (a path, or a URL for a checkpoint at a URL)."""
    return str(Location.of(checkpoint_path).entry)


def temp_owner() -> str:
    """``<host>-<pid>`` of this process: the part of a temp file's name that tells whose it is."""
    return f"{_host_name()}-{os.getpid()}"


@functools.cache
def _host_name() -> str:
    return socket.gethostname().replace(".", "_")


def temp_path(final_path: str) -> str:
    """A fresh temporary name on the same file system as the checkpoint, so a rename is atomic
    (local files only: a ``ValueError`` for a URL).

    ``<checkpoint>.<host>-<pid>.<random>.tmp``: the owner lets a later process remove the temp files
    of writers that died mid-write (:func:`fedckpt.storage.atomic.remove_stale_temps`).
    """
    final = Location.of(final_path)
    final.local_path("fedckpt.storage.paths.temp_path")
    # 48 random bits from the random module, without a system call (unlike uuid4): enough among one
    # process's temp files. The module reseeds itself in a forked child.
    name = f"{final.name}.{temp_owner()}.{random.getrandbits(48):012x}{TEMP_SUFFIX}"
    return str(final.control_dir.join(TEMP_DIR, name))


def temp_file_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp file's writer, from its name; None for a name fedckpt did not make."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or "." + parts[3] != TEMP_SUFFIX:
        return None
    host, _, pid = parts[1].rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None
