"""A checkpoint file laid out before it is written: its bytes in pieces, their size and checksum.

The checksum is known before a byte is written, so a writer can link a file identical to one
already stored instead of writing it (:mod:`fedckpt.storage.dedup`), for either format.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fedckpt.storage.checksum import checksum_of
from fedckpt.storage.direct import HashingFile
from fedckpt.storage.formats import MODULE
from fedckpt.storage.formats.safetensors_file import module_file_pieces
from fedckpt.storage.formats.torch_zip import state_file_pieces


class LaidOut(NamedTuple):
    """A checkpoint file's bytes in order (views of staging memory where they are the tensors')."""

    pieces: list[memoryview]
    size: int
    checksum: str  # what the manifest records: the checksum of the whole file
    direct: bool  # written past the page cache (model files, either format); states are read back soon


def lay_out(kind: str, layout: dict[str, Any], data: memoryview) -> LaidOut:
    """The file a snapshot of ``kind`` (``module`` or ``state``) with this ``layout`` and staged ``data`` makes."""
    pieces = module_file_pieces(layout, data) if kind == MODULE else state_file_pieces(layout, data)
    direct = kind == MODULE or layout.get("direct", False)
    return LaidOut(pieces, sum(len(piece) for piece in pieces), checksum_of(*pieces), direct)


def write_laid_out(file: LaidOut, path: str) -> None:
    """Write ``file``'s pieces to a new file at ``path``, front to back."""
    out = HashingFile(path, direct=file.direct, checksum=False)
    try:
        for piece in file.pieces:
            out.write(piece)
    finally:
        out.close()
