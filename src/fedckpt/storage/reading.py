"""Reading the two formats of :mod:`fedckpt.storage.formats` back into torch objects.

A checkpoint is read from its local file in place (mapped where that is faster), or, on an object
store, from the bytes of its current version (:func:`checkpoint_source`).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import pickle
import struct
from collections.abc import Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from fedckpt.skeleton import EXTRA_TENSOR_PREFIX, SKELETON_TENSOR_TAG
from fedckpt.storage import formats
from fedckpt.storage.base import storage_for

Source = str | bytes  # a local file's path, or a version's content


def checkpoint_source(path: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Source, str]:
    """Where to read checkpoint ``path`` from, and its format (``module``, ``state`` or ``unknown``).
    ``FileNotFoundError`` if it has no version."""
    storage = storage_for(path, storage_options)
    local = storage.local_path(path)
    if local is not None:
        return local, formats.file_format(local)
    version = storage.read_version(path)
    if version.entry is not None:
        return version.data, version.entry.format
    return version.data, formats.STATE if version.data[:2] == b"PK" else formats.MODULE


def _load_tensors(source: Source) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(source) if isinstance(source, bytes) else safetensors.torch.load_file(source)


def _description(source: Source) -> dict[str, str]:
    """fedckpt's metadata in a module file's safetensors header."""
    if isinstance(source, bytes):
        (length,) = struct.unpack("<Q", source[:8])
        metadata = json.loads(source[8 : 8 + length]).get("__metadata__") or {}
        return json.loads(metadata.get(formats.METADATA_KEY, "{}"))
    with safetensors.safe_open(source, framework="pt") as handle:
        return formats.description(handle)


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The tensors of a module checkpoint, by state-dict name; no pickle is run."""
    tensors = _load_tensors(source)
    return {name: tensor for name, tensor in tensors.items() if not name.startswith(EXTRA_TENSOR_PREFIX)}


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, tensors: dict[str, torch.Tensor]):
        super().__init__(file)
        self._tensors = tensors
        self._rebuilt: dict[str, torch.Tensor] = {}

    def persistent_load(self, pid: Any) -> Any:
        tag, name, is_parameter, requires_grad = pid
        if tag != SKELETON_TENSOR_TAG:
            raise pickle.UnpicklingError(f"Unknown persistent id {tag!r} in a fedckpt module checkpoint")
        if name not in self._rebuilt:  # tied weights come back as one object
            tensor = self._tensors[name]
            if is_parameter:
                tensor = nn.Parameter(tensor, requires_grad=requires_grad)
            elif requires_grad:
                tensor.requires_grad_(True)
            self._rebuilt[name] = tensor
        return self._rebuilt[name]


def read_module(source: Source) -> nn.Module:
    """Rebuild the ``nn.Module`` saved in a module checkpoint (runs pickle, like ``torch.load``)."""
    skeleton = base64.b64decode(_description(source)["skeleton"])
    tensors = _load_tensors(source)
    return _SkeletonUnpickler(io.BytesIO(skeleton), tensors).load()


# A state file this large is read mapped, then copied out: one copy from the page cache, where a
# full read has torch also check every record's CRC-32 (twice as slow at 100 MB, benchmarks/restore.py).
MAPPED_READ_MIN_BYTES = 1 << 20


def read_state(source: Source, mmap: bool = False) -> Any:
    """Load a state checkpoint (runs pickle: load only files you trust); ``mmap`` maps a local file's
    tensor data, else every tensor is in memory."""
    if isinstance(source, bytes):
        return torch.load(io.BytesIO(source), weights_only=False)
    path = source
    if mmap or os.path.getsize(path) < MAPPED_READ_MIN_BYTES:
        return torch.load(path, weights_only=False, mmap=mmap)
    return copy.deepcopy(torch.load(path, weights_only=False, mmap=True))
