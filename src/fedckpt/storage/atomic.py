"""Atomic, durable local files: write a temp file, fsync, rename over the target, fsync the directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from typing import TypeVar

from fedckpt.storage.paths import temp_path

HASH_CHUNK = 8 << 20
T = TypeVar("T")


def fsync_path(path: str) -> None:
    """fsync a file's data, or a directory's entries (what makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def write_durable_temp(final_path: str, write: Callable[[str], T]) -> tuple[str, T]:
    """Run ``write(temp)`` for a new temp file beside ``final_path`` and fsync it.

    Returns the temp path and what ``write`` returned. The temp file is removed if anything fails.
    """
    temp = temp_path(final_path)
    os.makedirs(os.path.dirname(temp), exist_ok=True)
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
    fsync_path(os.path.dirname(final_path) or ".")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
