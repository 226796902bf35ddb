"""The state format: the records of torch.save's pickling, in torch's zip layout, written by hand."""

from __future__ import annotations

import struct
import zipfile
from typing import Any

import xxhash

from fedckpt.storage.direct import HashingFile

# What torch's zip writer adds after the records of torch.save's pickling, and how it lays them out.
TORCH_ARCHIVE = "archive/"  # the directory torch names the records in when saving to a file object
TORCH_FORMAT_VERSION = b"3\n"
TORCH_RECORD_ALIGNMENT = 64  # record data starts on this boundary (torch.load(mmap=True) relies on it)
_PADDING_FIELD = 0x4246  # torch pads a record's local header with an extra field of this id ("FB")


def write_state_file(layout: dict[str, Any], data: memoryview, path: str) -> str:
    """Write the records collected from torch's own pickling in torch's zip format; return its checksum.

    Each record is stored uncompressed with its CRC-32, its data aligned as torch aligns it, then the
    ``version`` and ``.data/serialization_id`` records torch's writer ends with. The file is written
    front to back (data descriptors instead of seeking back), so it is hashed as it is written.
    Buffered, unlike model files: a state is read back soon (a Flower client restores it at the start
    of its next round), and from the page cache that read is a memory copy, not a disk read.
    """
    out = HashingFile(path, direct=False)
    try:
        write_state_records(layout, data, out)
    finally:
        checksum = out.close()
    assert checksum is not None
    return checksum


def write_state_records(layout: dict[str, Any], data: memoryview, out: Any) -> None:
    """The state file's bytes, front to back, into ``out`` (anything with ``write`` and ``tell``)."""
    records = [(name, data[begin:end]) for name, begin, end in layout["records"]]
    records += [("version", memoryview(TORCH_FORMAT_VERSION)), (".data/serialization_id", _serialization_id(records))]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, record in records:
            _write_record(archive, out, TORCH_ARCHIVE + name, record)


def _write_record(archive: zipfile.ZipFile, out: Any, name: str, record: memoryview) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.file_size = len(record)
    zip64 = len(record) > zipfile.ZIP64_LIMIT
    # The local header: 30 bytes, the name, the padding field (4 bytes + padding), zipfile's zip64 field.
    data_start = out.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    padding = -data_start % TORCH_RECORD_ALIGNMENT
    info.extra = struct.pack("<HH", _PADDING_FIELD, padding) + bytes(padding)
    with archive.open(info, "w", force_zip64=zip64) as entry:
        entry.write(record)


def _serialization_id(records: list[tuple[str, memoryview]]) -> memoryview:
    """A 40-digit id of the records' content, in the form torch's writer gives it: equal states, equal files."""
    digest = xxhash.xxh3_128()
    for name, record in records:
        digest.update(name.encode())
        digest.update(record)
    return memoryview(f"{digest.intdigest():040d}".encode())
