"""A small state file loaded in one read: its records found through the zip's directory, its pickle
unpickled as ``torch.load`` unpickles it, and every tensor a view of the bytes read.

For the optimizer state of a small model (300 KB, a few dozen records) ``torch.load`` spends most
of its time on per-record work in its zip reader (a read, a CRC-32 check and a storage each); here a
record is a slice of one buffer. A file this reader does not cover (compressed records, another
byte order, tensors saved on a device) raises :class:`NeedsTorchLoad`, and the caller uses
``torch.load``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
from typing import Any

import torch

from fedckpt import _compat

# torch.load's renames of modules a pickle may name (torch.serialization's load_module_mapping).
_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}
_LOCAL_HEADER_SIZE = 30
# The zip's end record, and the fields of a central directory entry this reader uses (APPNOTE 4.3.12).
_END = struct.Struct("<IHHHHIIH")
_CENTRAL = struct.Struct("<I6xH8xI4xHHH8xI")  # signature, method, size, name/extra/comment lengths, offset


class NeedsTorchLoad(Exception):
    """The file holds something this reader leaves to ``torch.load``."""


def load_small_state(path: str) -> Any:
    """What ``torch.load(path, weights_only=False)`` returns, for a file of tensors saved on the CPU."""
    raw = _read_all(path)
    records = _records(raw)
    pickled = next((name for name in records if name.endswith("/data.pkl")), None)
    if pickled is None:
        raise NeedsTorchLoad(f"{path}: no data.pkl record")
    archive = pickled[: -len("data.pkl")]
    byteorder = records.get(archive + "byteorder")
    if byteorder is not None and bytes(raw[byteorder[0] : byteorder[1]]).decode() != sys.byteorder:
        raise NeedsTorchLoad(f"{path}: saved with another byte order")
    begin, end = records[pickled]
    unpickler = _StateUnpickler(io.BytesIO(raw[begin:end]), raw, records, archive)
    state = unpickler.load()
    _compat.validate_loaded_sparse_tensors()
    return state


def _read_all(path: str) -> bytearray:
    fd = os.open(path, os.O_RDONLY)  # not open(): its file object costs more than the read, here
    try:
        raw = bytearray(os.fstat(fd).st_size)
        with memoryview(raw) as view:
            done = 0
            while done < len(raw):
                count = os.readv(fd, [view[done:]])
                if not count:
                    raise NeedsTorchLoad(f"{path}: shorter than its size")
                done += count
    finally:
        os.close(fd)
    return raw


def _records(raw: bytearray) -> dict[str, tuple[int, int]]:
    """Each record's name and where its bytes are in ``raw``, from the zip's central directory (a
    small file's: no zip64 fields, no archive comment, as torch and fedckpt write them)."""
    end = len(raw) - _END.size
    if end < 0 or raw[end : end + 4] != b"PK\x05\x06":
        raise NeedsTorchLoad("no end of central directory record at the end of the file")
    count, size, offset = _END.unpack_from(raw, end)[4:7]
    if offset + size > end or count == 0xFFFF:
        raise NeedsTorchLoad("a zip64 directory")
    records, at = {}, offset
    for _ in range(count):
        signature, method, stored, name_length, extra_length, comment_length, header = _CENTRAL.unpack_from(raw, at)
        if signature != 0x02014B50 or method != 0 or header == 0xFFFFFFFF:
            raise NeedsTorchLoad("a compressed record or one past the zip64 limit")
        name = bytes(raw[at + _CENTRAL.size : at + _CENTRAL.size + name_length]).decode()
        local_name, local_extra = struct.unpack_from("<HH", raw, header + 26)
        start = header + _LOCAL_HEADER_SIZE + local_name + local_extra
        records[name] = (start, start + stored)
        at += _CENTRAL.size + name_length + extra_length + comment_length
    return records


class _StateUnpickler(pickle.Unpickler):
    """torch.load's unpickler, its storages slices of the file's bytes."""

    def __init__(self, file: io.BytesIO, raw: bytearray, records: dict[str, tuple[int, int]], archive: str) -> None:
        super().__init__(file)
        self._raw = raw
        self._records = records
        self._archive = archive
        self._storages: dict[str, torch.storage.TypedStorage] = {}
        self._fake_mode = _compat.fake_mode_active()  # asked once, not per tensor as torch.load does

    def find_class(self, module: str, name: str) -> Any:
        if name == "_rebuild_tensor_v2" and module == "torch._utils" and not self._fake_mode:
            return _compat.rebuild_host_tensor
        if "Storage" in name:
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        return super().find_class(_MODULE_RENAMES.get(module, module), name)

    def persistent_load(self, pid: Any) -> Any:
        typename, storage_type, key, location, numel = pid
        if _text(typename) != "storage" or _text(location) != "cpu":
            raise NeedsTorchLoad(f"a storage saved on {_text(location)!r}")
        key = _text(key)
        if key not in self._storages:
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            begin, end = self._records[f"{self._archive}data/{key}"]
            nbytes = numel * dtype.itemsize
            if end - begin != nbytes:
                raise NeedsTorchLoad(f"record data/{key} holds {end - begin} bytes, not {nbytes}")
            if nbytes:  # the tensor holds a reference to the buffer: the bytes stay while it lives
                untyped = torch.frombuffer(self._raw, dtype=torch.uint8, count=nbytes, offset=begin).untyped_storage()
            else:
                untyped = torch.UntypedStorage(0)
            self._storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self._storages[key]


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value
