"""Atomic, durable local files: write a temp file, fsync, rename over the target, fsync the directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TypeVar

from fedckpt.storage.paths import temp_file_owner, temp_owner, temp_path

T = TypeVar("T")

_swept_dirs: set[str] = set()  # temp directories this process already cleaned


def fsync_path(path: str) -> None:
    """fsync a file's data, or a directory's entries (what makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable_temp(final_path: str, write: Callable[[str], T]) -> tuple[str, T]:
    """Run ``write(temp)`` for a new temp file beside ``final_path`` and fsync it.

    Returns the temp path and what ``write`` returned. The temp file is removed if anything fails.
    """
    temp = temp_path(final_path)
    os.makedirs(os.path.dirname(temp), exist_ok=True)
    if os.path.dirname(temp) not in _swept_dirs:
        remove_stale_temps(os.path.dirname(temp))
        _swept_dirs.add(os.path.dirname(temp))
    try:
        result = write(temp)
        fsync_path(temp)
    except BaseException:
        remove_quietly(temp)
        raise
    return temp, result


def publish(temp: str, final_path: str) -> None:
    """Atomically move a durable temp file into place and make the rename durable."""
    os.replace(temp, final_path)
    if os.path.lexists(temp):  # a hard link to the file already in place: rename leaves both names
        os.remove(temp)
    fsync_path(os.path.dirname(final_path) or ".")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def remove_stale_temps(temp_dir: str) -> list[str]:
    """Remove the temp files in ``temp_dir`` left by writers on this host that no longer run.

    A writer killed mid-write (SIGKILL, a lost node) leaves its temp file behind; the checkpoint
    itself is untouched. Files of live processes, other hosts or unknown names are kept.
    """
    host = temp_owner().rpartition("-")[0]
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(temp_dir):
            owner = temp_file_owner(name)
            if owner is not None and owner[0] == host and not process_alive(owner[1]):
                remove_quietly(os.path.join(temp_dir, name))
                removed.append(name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
