"""The module format: one safetensors file, its data section exactly as the caller staged it."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, NamedTuple

from fedckpt.storage.direct import BLOCK
from fedckpt.storage.formats import METADATA_KEY, MODULE_FORMAT_VERSION

# torch dtype name -> safetensors dtype code, for every dtype a model checkpoint can hold.
SAFETENSORS_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
}  # fmt: skip


class TensorInfo(NamedTuple):
    """What the file needs to know of one tensor (the snapshot gives it; its bytes travel apart)."""

    dtype: str  # torch's dtype name, without "torch."
    itemsize: int
    shape: tuple[int, ...]
    nbytes: int


# Where one tensor's bytes are in a module file's data section: (name, safetensors dtype code, shape,
# begin, end). A plain tuple, not a NamedTuple: thousands travel pickled with every save, and a
# NamedTuple pickles seven times slower (+1.2 ms per save of 2,000 tensors).
TensorEntry = tuple[str, str, tuple[int, ...], int, int]


def data_section(tensors: dict[str, TensorInfo]) -> list[TensorEntry]:
    """The tensors in file order, with their offsets. Widest dtypes first, as safetensors lays them
    out: every tensor stays naturally aligned."""
    order = sorted(tensors, key=lambda name: (-tensors[name].itemsize, name))
    entries: list[TensorEntry] = []
    offset = 0
    for name in order:
        info = tensors[name]
        entries.append((name, SAFETENSORS_CODES[info.dtype], info.shape, offset, offset + info.nbytes))
        offset += info.nbytes
    return entries


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


def module_file_pieces(layout: dict[str, Any], data: memoryview) -> list[memoryview]:
    """A module snapshot's safetensors file, in pieces: its header (:func:`safetensors_header`), then
    the data region as staged (already in safetensors order)."""
    return [memoryview(safetensors_header(layout)), data]
