"""The checksum a manifest entry records for its checkpoint: ``"<algorithm>:<hex>"``.

CRC-32 (zlib): it catches torn and corrupted files, which is its job here, at about 4 GB/s on one
core, against 1.7 GB/s for SHA-256. The writer computes it while it writes, in the background but
on the same cores as training, so its cost is training's cost. Entries written with SHA-256 by
earlier versions (``sha256`` field) still verify.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

ALGORITHM = "crc32"
READ_CHUNK = 8 << 20


class RunningChecksum:
    """The checksum of bytes fed in order."""

    def __init__(self, algorithm: str = ALGORITHM) -> None:
        if algorithm not in ("crc32", "sha256"):
            raise ValueError(f"Unknown checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._crc = 0
        self._sha = hashlib.sha256() if algorithm == "sha256" else None

    def update(self, data: Any) -> None:
        if self._sha is not None:
            self._sha.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> str:
        digest = self._sha.hexdigest() if self._sha is not None else f"{self._crc:08x}"
        return f"{self.algorithm}:{digest}"


def checksum_of_file(path: str, algorithm: str = ALGORITHM) -> str:
    running = RunningChecksum(algorithm)
    with open(path, "rb", buffering=0) as file:
        buffer = bytearray(READ_CHUNK)
        view = memoryview(buffer)
        while count := file.readinto(buffer):
            running.update(view[:count])
    return running.value()


def file_matches(path: str, recorded: str) -> bool:
    """Whether ``path`` has the checksum ``recorded`` (``"<algorithm>:<hex>"``)."""
    algorithm, _, _ = recorded.partition(":")
    return checksum_of_file(path, algorithm) == recorded
