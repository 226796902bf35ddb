"""Atomic, durable local files: write a temp file, fsync, rename over the target, fsync the directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable

from fedckpt.storage.paths import temp_path

HASH_CHUNK = 8 << 20


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
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


def write_durable_temp(final_path: str, write: Callable[[str], None]) -> str:
    """Run ``write(temp)`` for a new temp file beside ``final_path``, fsync it, return its path.

    The temp file is removed if anything fails.
    """
    temp = temp_path(final_path)
    os.makedirs(os.path.dirname(temp), exist_ok=True)
    try:
        write(temp)
        fsync_file(temp)
    except BaseException:
        remove_quietly(temp)
        raise
    return temp


def publish(temp: str, final_path: str) -> None:
    """Atomically move a durable temp file into place and make the rename durable."""
    os.replace(temp, final_path)
    fsync_dir(os.path.dirname(final_path) or ".")


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
