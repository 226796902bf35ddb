"""Names of checkpoint files and of fedckpt's own files beside them.

A checkpoint is a local path or a URL of an fsspec file system (``s3://bucket/run-7/best.pt``).
URLs are joined and normalised as POSIX paths after their ``protocol://``.
"""

from __future__ import annotations

import os
import posixpath
import re
import socket
import uuid

CONTROL_DIR = ".fedckpt"
TEMP_DIR = "tmp"
ENTRY_SUFFIX = ".json"
TEMP_SUFFIX = ".tmp"


_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a location on an fsspec file system other than local files."""
    match = _URL.match(os.fspath(path))
    return match is not None and match.group(1).lower() not in ("file", "local")


def _split_url(url: str) -> tuple[str, str]:
    match = _URL.match(url)
    assert match is not None
    return match.group(1).lower(), match.group(2)


def checkpoint_key(path: str | os.PathLike[str]) -> str:
    """The runtime's key of a checkpoint: its absolute, normalised path, or its normalised URL."""
    path = os.fspath(path)
    if is_url(path):
        protocol, rest = _split_url(path)
        return f"{protocol}://{posixpath.normpath(rest).lstrip('/')}"
    if _URL.match(path):  # file:// and local://
        path = _split_url(path)[1]
    return os.path.abspath(path)


def checkpoint_path_in(directory: str | os.PathLike[str], name: str) -> str:
    """``directory/name``, or a ``ValueError`` naming what is wrong with ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"A checkpoint name must be a string, got {type(name).__name__}")
    if name == "" or name.strip() == "":
        raise ValueError("A checkpoint name must not be empty")
    if "\x00" in name:
        raise ValueError(f"Checkpoint name {name!r} contains a NUL character")
    if os.path.isabs(name) or is_url(name):  # FL4Health accepts the full path of a file inside the directory
        base, full = checkpoint_key(directory), checkpoint_key(name)
        inside = posixpath.relpath(full, base) if is_url(full) else os.path.relpath(full, base)
        if is_url(full) != is_url(base) or inside == os.curdir or inside.split(os.sep)[0] == os.pardir:
            raise ValueError(f"Checkpoint path {name!r} is not inside the checkpoint directory {directory!r}")
        name = inside
    parts = os.path.normpath(name).split(os.sep)
    if parts[0] == ".." or name.endswith(("/", os.sep)) or parts == ["."]:
        raise ValueError(f"Checkpoint name {name!r} escapes the checkpoint directory or names a directory")
    if CONTROL_DIR in parts:
        raise ValueError(f"Checkpoint name {name!r} uses {CONTROL_DIR!r}, which fedckpt keeps for itself")
    if any(len(part.encode()) > 200 for part in parts):
        raise ValueError(f"Checkpoint name {name[:40]!r}... has a path component longer than 200 bytes")
    # Normalized, so that the writer (which keys by absolute path) and a loader name the same file:
    # "a/../b" would otherwise need a directory "a" to exist to be read back.
    joined = os.path.join(os.fspath(directory), os.path.normpath(name))
    # A URL is normalised as the writer keys it (an object store's keys are literal: "a/../b" is a name).
    return checkpoint_key(joined) if is_url(joined) else joined


def control_dir(checkpoint_path: str) -> str:
    """``.fedckpt`` beside the checkpoint (or the one it is already in, for fedckpt's own files)."""
    directory = os.path.dirname(checkpoint_path)
    return directory if os.path.basename(directory) == CONTROL_DIR else os.path.join(directory, CONTROL_DIR)


def entry_path(checkpoint_path: str) -> str:
    """Where the manifest entry of a checkpoint lives."""
    return os.path.join(control_dir(checkpoint_path), os.path.basename(checkpoint_path) + ENTRY_SUFFIX)


def temp_owner() -> str:
    """``<host>-<pid>`` of this process: the part of a temp file's name that tells whose it is."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def temp_path(final_path: str) -> str:
    """A fresh temporary name on the same file system as the checkpoint, so a rename is atomic.

    ``<checkpoint>.<host>-<pid>.<random>.tmp``: the owner lets a later process remove the temp files
    of writers that died mid-write (:func:`fedckpt.storage.atomic.remove_stale_temps`).
    """
    name = f"{os.path.basename(final_path)}.{temp_owner()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    return os.path.join(control_dir(final_path), TEMP_DIR, name)


def temp_file_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp file's writer, from its name; None for a name fedckpt did not make."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or "." + parts[3] != TEMP_SUFFIX:
        return None
    host, _, pid = parts[1].rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None
