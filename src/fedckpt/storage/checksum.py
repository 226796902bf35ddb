"""The checksum a manifest entry records for its checkpoint: ``"<algorithm>:<hex>"``.

XXH3-128 (the ``xxhash`` package): it catches torn and corrupted files, which is its job here,
and identifies identical content (see :mod:`fedckpt.storage.dedup`), at about 20 GB/s on one core,
against 2 GB/s for zlib's CRC-32 and 1.7 GB/s for SHA-256. The writer computes it in the
background but on the same cores as training, so its cost is training's cost. Entries written by
earlier versions (``crc32:``, ``sha256:``) still verify.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import xxhash

ALGORITHM = "xxh3"
ALGORITHMS = ("xxh3", "crc32", "sha256")
READ_CHUNK = 8 << 20


class RunningChecksum:
    """The checksum of bytes fed in order."""

    def __init__(self, algorithm: str = ALGORITHM) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"Unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm
        self._crc = 0
        self._hash = xxhash.xxh3_128() if algorithm == "xxh3" else hashlib.sha256() if algorithm == "sha256" else None

    def update(self, data: Any) -> None:
        if self._hash is not None:
            self._hash.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> str:
        digest = self._hash.hexdigest() if self._hash is not None else f"{self._crc:08x}"
        return f"{self.algorithm}:{digest}"


def checksum_of(*parts: Any) -> str:
    """The checksum of ``parts`` one after the other (the bytes of a file not written yet)."""
    running = RunningChecksum()
    for part in parts:
        running.update(part)
    return running.value()


def checksum_of_file(path: str | int, algorithm: str = ALGORITHM) -> str:
    """The checksum of the file at ``path``, or of the open descriptor ``path`` from its current offset
    (left open)."""
    running = RunningChecksum(algorithm)
    with open(path, "rb", buffering=0, closefd=not isinstance(path, int)) as file:
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while count := file.readinto(buffer):
            running.update(view[:count])
    return running.value()


def file_matches(path: str, recorded: str) -> bool:
    """Whether ``path`` has the checksum ``recorded`` (``"<algorithm>:<hex>"``)."""
    algorithm, _, _ = recorded.partition(":")
    return checksum_of_file(path, algorithm) == recorded
