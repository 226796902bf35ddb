"""The two on-disk formats, one job each.

* ``module``: a model checkpoint. A safetensors file: the state-dict tensors, plus the model's
  pickled structure (without tensor data) in the header metadata. ``load_state_dict`` reads the
  tensors without running pickle; ``load_checkpoint`` rebuilds the ``nn.Module``.
* ``state``: a per-round state checkpoint in ``torch.save``'s zip format: the records torch's own
  pickling produced, so ``torch.load(path, weights_only=False)`` (``mmap=True`` too) reads it.

Writing needs neither torch nor its zip writer: a writer process that imports torch spends about
1.3 s of CPU on it, taken from training on a busy node. Reading is in :mod:`fedckpt.storage.reading`.
"""

from __future__ import annotations

import base64
import json
import struct
import zipfile
from typing import Any

import safetensors
import xxhash

from fedckpt.storage.direct import BLOCK, HashingFile

MODULE = "module"
STATE = "state"

# One metadata key holding JSON: the file is the same bytes (and checksum) whoever writes it.
METADATA_KEY = "fedckpt"
MODULE_FORMAT_VERSION = "module/1"
# What torch's zip writer adds after the records of torch.save's pickling, and how it lays them out.
TORCH_ARCHIVE = "archive/"  # the directory torch names the records in when saving to a file object
TORCH_FORMAT_VERSION = b"3\n"
TORCH_RECORD_ALIGNMENT = 64  # record data starts on this boundary (torch.load(mmap=True) relies on it)
_PADDING_FIELD = 0x4246  # torch pads a record's local header with an extra field of this id ("FB")


def safetensors_header(layout: dict[str, Any]) -> bytes:
    """The safetensors header (length prefix, JSON, space padding to a block) of a module snapshot."""
    header: dict[str, Any] = {
        name: {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        for name, code, shape, begin, end in layout["tensors"]
    }
    description = {"format": MODULE_FORMAT_VERSION, "skeleton": base64.b64encode(layout["skeleton"]).decode()}
    header["__metadata__"] = {METADATA_KEY: json.dumps(description, sort_keys=True)}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    # Spaces pad the header so that the data section starts on a block boundary: the writer can then
    # send the staged data to disk as it is (direct I/O). JSON ignores them; safetensors allows them.
    text += b" " * (-(len(text) + 8) % BLOCK)
    return struct.pack("<Q", len(text)) + text


def write_module_file(header: bytes, data: memoryview, path: str) -> None:
    """Write a module snapshot as one safetensors file: ``header`` (:func:`safetensors_header`),
    then the data region as staged.

    The staged data is already in safetensors order, so this is one sequential write. The caller
    knows the file's checksum already (it is the checksum of ``header`` and ``data``).
    """
    out = HashingFile(path, checksum=False)
    try:
        out.write(header)
        out.write(data)
    finally:
        out.close()


def write_state_file(layout: dict[str, Any], data: memoryview, path: str) -> str:
    """Write the records collected from torch's own pickling in torch's zip format; return its checksum.

    Each record is stored uncompressed with its CRC-32, its data aligned as torch aligns it, then the
    ``version`` and ``.data/serialization_id`` records torch's writer ends with. The file is written
    front to back (data descriptors instead of seeking back), so it is hashed as it is written.
    Buffered, unlike model files: a state is read back soon (a Flower client restores it at the start
    of its next round), and from the page cache that read is a memory copy, not a disk read.
    """
    records = [(name, data[begin:end]) for name, begin, end in layout["records"]]
    records += [("version", memoryview(TORCH_FORMAT_VERSION)), (".data/serialization_id", _serialization_id(records))]
    out = HashingFile(path, direct=False)
    try:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, record in records:
                _write_record(archive, out, TORCH_ARCHIVE + name, record)
    finally:
        checksum = out.close()
    assert checksum is not None
    return checksum


def _write_record(archive: zipfile.ZipFile, out: HashingFile, name: str, record: memoryview) -> None:
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


def file_format(path: str) -> str:
    """``module`` for a fedckpt model file, ``state`` for a torch zip file, ``unknown`` otherwise."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head[:2] == b"PK":
        return STATE
    if len(head) == 9 and head[8:9] == b"{":
        try:
            with safetensors.safe_open(path, framework="numpy") as handle:
                if description(handle).get("format", "").startswith("module/"):
                    return MODULE
        except Exception:
            return "unknown"
    return "unknown"


def description(handle: Any) -> dict[str, str]:
    """The fedckpt metadata of an open safetensors file (empty if it has none)."""
    metadata = handle.metadata() or {}
    try:
        return json.loads(metadata.get(METADATA_KEY, "{}"))
    except ValueError:
        return {}
